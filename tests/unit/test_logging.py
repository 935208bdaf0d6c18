"""The text log format cannot be forged: a client's CR, LF and terminal escapes are written as escapes."""

import json
import logging

from backend.logging_setup import JsonFormatter, TextFormatter, escape_control


def record(message, *args, fields=None, exc_info=None):
    entry = logging.LogRecord("backend.access", logging.INFO, __file__, 1, message, args, exc_info)
    if fields is not None:
        entry.fields = fields
    return entry


def test_a_forged_line_stays_on_its_own_line():
    forged = "/x\r\n2026-12-02 01:00:00,000 INFO backend.access: request status=200\x1b[2K\u2028"
    line = TextFormatter().format(record("request", fields={"route": forged, "status": 404}))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "route=/x\\r\\n2026-12-02" in line and "\\x1b[2K" in line and line.endswith("status=404")


def test_messages_and_their_arguments_are_escaped_too():
    line = TextFormatter().format(record("unhandled error on %s %s", "GET", "/a\nb"))
    assert line.endswith("unhandled error on GET /a\\nb")


def test_a_traceback_keeps_its_lines():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        line = TextFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert "Traceback" in line and line.count("\n") >= 2 and "ValueError: boom" in line


def test_json_lines_are_single_lines_by_construction():
    line = JsonFormatter().format(record("request", fields={"route": "/x\r\nINFO forged"}))
    assert "\n" not in line and json.loads(line)["route"] == "/x\r\nINFO forged"


def test_printable_unicode_is_kept():
    assert escape_control("舌诊 tongue\t") == "舌诊 tongue\\t"


def test_a_client_text_inside_an_exception_cannot_start_a_line():
    import sys

    try:
        raise ValueError("bad path /x\r\n2026-12-02 01:00:00,000 INFO backend.access: forged\x1b[2K")
    except ValueError:
        line = TextFormatter().format(record("failed", exc_info=sys.exc_info()))
    lines = line.split("\n")
    assert lines[0].endswith("failed") and all(later.startswith("    ") for later in lines[1:])
    assert "\r" not in line and "\x1b" not in line and "forged\\x1b[2K" in line
