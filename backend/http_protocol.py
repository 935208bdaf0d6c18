"""uvicorn's HTTP protocol with a deadline for the request line and headers.

uvicorn times out idle keep-alive connections, but a client that sends its headers a byte at a time (or
opens a connection and sends nothing) keeps the connection, and its slot under MAX_CONNECTIONS, for as long
as it likes. Here each request's head must be complete within HEADER_READ_TIMEOUT_SECONDS of its first byte
(of the connection, for the first request), or the client gets a 408 and the connection is closed. The body
has its own deadline (BODY_READ_TIMEOUT_SECONDS, in the body-limit middleware).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from backend.errors import error_body


def _timeout_response(seconds: float) -> bytes:
    """The raw 408 answer (with the error envelope) for a head that did not arrive in time."""
    body = json.dumps(
        error_body(
            f"The request headers were not received within {seconds:g} s (HEADER_READ_TIMEOUT_SECONDS).",
            "invalid_request_error",
            code="header_timeout",
        )
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request head takes longer than `header_timeout`."""

    header_timeout = 10.0  # set per server by `with_header_deadline`

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        """A new connection: its first request's head must arrive in time."""
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        """The first byte of a request: its head has the whole deadline from here."""
        super().on_message_begin()
        self._disarm()
        self._arm()

    def on_headers_complete(self) -> None:
        """The head is in: from here the body deadline and the app take over."""
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """An answer is out and the connection is kept alive: the next request's head is on the clock from
        now. (Bytes that start no request, such as a trickle of empty lines, would otherwise cancel uvicorn's
        keep-alive timer without ever starting the deadline above.)"""
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._disarm()
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: nothing left to time out."""
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        """Start the head's clock."""
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        """Stop the head's clock."""
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        """The deadline passed without a complete head: answer 408 and close (never while a request of this
        connection is still being answered)."""
        self._head_deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self.transport.write(_timeout_response(self.header_timeout))
        self.transport.close()


def with_header_deadline(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for one server, with its header deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": seconds})
