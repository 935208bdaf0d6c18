"""Log formatting: `LOG_FORMAT=text` (readable lines) or `json` (one JSON object per line, for log shippers).

Structured fields travel in a record's `fields` attribute (`logger.info("request", extra={"fields": {...}})`);
both formats print them.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# C0 and C1 control characters and Unicode line separators: a client's text (a path such as
# `/x%0d%0a2026-... INFO ...`, a header) must not be able to start a forged log line or move the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """`text` with control characters written as escapes (`\\r`, `\\n`, `\\x1b`)."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`, one line per record; a traceback follows on lines of its
    own, each indented so that no client text in an exception message can pass for a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # Format a copy whose message is already escaped; the traceback, written by us, keeps its lines.
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = escape_control(record.getMessage()), None
        line = super().format(safe)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={escape_control(str(value))}" for key, value in fields.items())
        return line

    def formatException(self, exc_info) -> str:  # noqa: N802 (logging's name)
        """The traceback, every line indented and escaped (an exception message may quote a client)."""
        text = super().formatException(exc_info)
        return "\n".join("    " + escape_control(line) for line in text.split("\n"))


def configure_logging(level: str, log_format: str) -> None:
    """Route every logger (uvicorn's too) through one handler with the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
