"""Image URL fetching when the far side misbehaves: stalls, names that do not resolve, bodies without a
Content-Length that pass the size cap, and redirect chains.

Every test talks to a real HTTP server on 127.0.0.1 (an asyncio server on port 0, written by hand so it can
send exactly the bytes a bad server sends), through `ImageIntake` built from `Settings` as the app builds it,
with IMAGE_URL_ALLOW_PRIVATE_NETWORKS set so loopback is allowed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from backend.errors import ImageTooLargeError, InvalidImageError
from backend.media import ImageInput, ImageIntake
from backend.media.fetch import MAX_REDIRECTS
from backend.settings import Settings
from tests import images

MAX_BYTES = 1000  # MAX_IMAGE_BYTES for these tests: small, so "over the cap" is a few chunks
TIMEOUT = 0.5  # IMAGE_URL_TIMEOUT_SECONDS: short, so a stall is detected quickly
GUARD = 15.0  # a test waits at most this long: a broken deadline fails the test instead of hanging it
# How long past IMAGE_URL_TIMEOUT_SECONDS a refused fetch may take (a loaded 2-core machine is slow). It is
# below httpx's own 5 s default timeout, so a fetch that only ended through that default would fail.
SLACK = 3.0
SOURCE = "image[0]"
PNG = images.png(20, 10)

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


def head(status: str, headers: dict[str, str]) -> bytes:
    """A status line and headers, as bytes."""
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    """A route that sends fixed bytes (the server drains and closes after it)."""
    writer.write(data)


class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 whose every path is a coroutine writing the raw response."""

    def __init__(self) -> None:
        self.routes: dict[str, Writer] = {}
        self.requests: list[str] = []  # request paths, in order
        self._stall = asyncio.Event()  # never set: what a hung server waits on; closing the server ends it
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stall(self) -> None:
        """Hold the connection open, sending nothing more."""
        await self._stall.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        try:
            request_line = (await reader.readline()).decode("latin-1")
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # the headers: not needed
            path = request_line.split(" ")[1] if request_line.count(" ") >= 2 else "/"
            self.requests.append(path)
            route = self.routes.get(path)
            if route is None:
                writer.write(head("404 Not Found", {"Content-Length": "0"}))
            else:
                await route(writer)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client gave up (as it should on a stall) or the server is closing
        finally:
            writer.close()
            self._handlers.discard(asyncio.current_task())

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):  # stalled handlers wait forever otherwise
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def server():
    async with LoopbackServer() as running:
        yield running


def intake(**overrides) -> ImageIntake:
    """The image intake as the app builds it from its settings, fetching from loopback."""
    values = {
        "image_url_allowed_domains": "127.0.0.1,invalid",
        "image_url_allow_private_networks": True,
        "image_url_timeout_seconds": TIMEOUT,
        "max_image_bytes": MAX_BYTES,
        **overrides,
    }
    return ImageIntake(Settings(_env_file=None, **values))


async def load(url: str, **overrides):
    """Fetch and decode one image URL; bounded by GUARD so a missing deadline cannot hang the suite."""
    return await asyncio.wait_for(intake(**overrides).load([ImageInput(SOURCE, url=url)]), GUARD)


async def refused(url: str, error: type[Exception], **overrides):
    """The error `load` raises for `url` (asserting its type, the image it names and its timing)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(error) as caught:
        await load(url, **overrides)
    assert caught.value.param == SOURCE and SOURCE in caught.value.message
    return caught.value, loop.time() - started


# --- stalls: one deadline for the whole fetch ---


async def test_a_server_that_never_answers_is_a_timeout(server):
    """Connected, request sent, no status line ever: `image_url_timeout` once IMAGE_URL_TIMEOUT_SECONDS pass."""
    server.routes["/silent.png"] = lambda writer: server.stall()
    error, elapsed = await refused(server.url("/silent.png"), InvalidImageError)
    assert error.code == "image_url_timeout" and error.status_code == 400
    assert f"{TIMEOUT:g} s" in error.message
    assert elapsed < TIMEOUT + SLACK  # the fetch's own deadline ended it, not a library default or the guard


async def test_a_body_that_stops_halfway_is_a_timeout(server):
    """Headers promise 800 bytes, 100 arrive, then nothing: the deadline covers the body too."""

    async def half_then_stall(writer):
        writer.write(head("200 OK", {"Content-Type": "image/png", "Content-Length": "800"}) + PNG[:100])
        await writer.drain()
        await server.stall()

    server.routes["/half.png"] = half_then_stall
    error, elapsed = await refused(server.url("/half.png"), InvalidImageError)
    assert error.code == "image_url_timeout"
    assert elapsed < TIMEOUT + SLACK


async def test_a_slow_drip_is_stopped_by_the_total_deadline(server):
    """A byte every 50 ms never trips a per-read timeout, but 800 of them take 40 s: the whole fetch has one
    deadline, so it ends after IMAGE_URL_TIMEOUT_SECONDS."""

    async def drip(writer):
        writer.write(head("200 OK", {"Content-Type": "image/png", "Content-Length": "800"}))
        for _ in range(800):
            writer.write(b"\0")
            await writer.drain()
            await asyncio.sleep(0.05)  # the server's pace (the behaviour under test), not synchronisation

    server.routes["/drip.png"] = drip
    error, elapsed = await refused(server.url("/drip.png"), InvalidImageError)
    assert error.code == "image_url_timeout"
    assert elapsed < TIMEOUT + SLACK


# --- names that do not resolve ---


async def test_a_host_that_does_not_resolve_is_unreachable():
    """`.invalid` never resolves (RFC 2606): a 400 `image_url_unreachable` naming the host, not a 500."""
    error, _ = await refused("http://no-such-image-host.invalid/tongue.png", InvalidImageError)
    assert error.code == "image_url_unreachable" and error.status_code == 400
    assert "no-such-image-host.invalid" in error.message and "resolve" in error.message


async def test_a_redirect_to_a_host_that_does_not_resolve_is_unreachable(server):
    """The resolution check runs on every hop, and a failing one is the same clear 400."""
    server.routes["/away"] = lambda writer: _write(
        writer, head("302 Found", {"Location": "http://gone.invalid/t.png", "Content-Length": "0"})
    )
    error, _ = await refused(server.url("/away"), InvalidImageError)
    assert error.code == "image_url_unreachable" and "gone.invalid" in error.message


# --- the size cap without a Content-Length ---


def chunk(data: bytes) -> bytes:
    """One chunk of a `Transfer-Encoding: chunked` body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_a_chunked_body_over_the_cap_is_413_while_it_streams(server):
    """No Content-Length to refuse up front: the cap is counted as chunks arrive. The server sends 1200 bytes
    and then hangs without ending the body, so only a fetcher that stops at the cap answers 413 (one that
    reads to the end would wait for the timeout instead)."""

    async def chunked_over_cap(writer):
        writer.write(head("200 OK", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}))
        for _ in range(3):
            writer.write(chunk(b"\0" * 400))
        await writer.drain()
        await server.stall()

    server.routes["/chunked.png"] = chunked_over_cap
    error, _ = await refused(server.url("/chunked.png"), ImageTooLargeError)
    assert error.status_code == 413 and error.code == "image_too_large"
    assert "MAX_IMAGE_BYTES" in error.message and str(MAX_BYTES) in error.message


async def test_a_body_ended_by_closing_the_connection_is_capped_too(server):
    """HTTP/1.0 style: no Content-Length, no chunking, the body runs until the connection closes (and here
    it does not close): the cap still stops it at once."""

    async def unframed_over_cap(writer):
        writer.write(head("200 OK", {"Content-Type": "image/png", "Connection": "close"}) + b"\0" * 1500)
        await writer.drain()
        await server.stall()

    server.routes["/unframed.png"] = unframed_over_cap
    error, _ = await refused(server.url("/unframed.png"), ImageTooLargeError)
    assert error.code == "image_too_large"


async def test_a_chunked_image_under_the_cap_is_fetched(server):
    """The baseline for the two above: a chunked body within the cap is an ordinary image."""
    assert len(PNG) < MAX_BYTES

    async def chunked_png(writer):
        writer.write(head("200 OK", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}))
        for start in range(0, len(PNG), 50):
            writer.write(chunk(PNG[start : start + 50]))
        writer.write(b"0\r\n\r\n")

    server.routes["/small.png"] = chunked_png
    [image] = await load(server.url("/small.png"))
    assert image.original_size == (20, 10)


# --- redirects ---


def redirect_chain(server: LoopbackServer, hops: int) -> str:
    """Routes /hop/<hops> -> ... -> /hop/0 (the image), each a relative 302; returns the first URL."""

    def redirect_to(target: str):
        return lambda writer: _write(writer, head("302 Found", {"Location": target, "Content-Length": "0"}))

    for hop in range(1, hops + 1):
        server.routes[f"/hop/{hop}"] = redirect_to(f"/hop/{hop - 1}")
    server.routes["/hop/0"] = lambda writer: _write(
        writer, head("200 OK", {"Content-Type": "image/png", "Content-Length": str(len(PNG))}) + PNG
    )
    return server.url(f"/hop/{hops}")


async def test_the_redirect_limit_allows_exactly_max_redirects(server):
    """MAX_REDIRECTS hops are followed to the image; one more is refused naming the limit, and the server
    never sees a request beyond the limit."""
    [image] = await load(redirect_chain(server, MAX_REDIRECTS))
    assert image.original_size == (20, 10)

    server.requests.clear()
    error, _ = await refused(redirect_chain(server, MAX_REDIRECTS + 1), InvalidImageError)
    assert error.code == "image_url_not_allowed" and f"more than {MAX_REDIRECTS} times" in error.message
    assert server.requests == [f"/hop/{hop}" for hop in range(MAX_REDIRECTS + 1, 0, -1)]


async def test_a_redirect_loop_ends_at_the_limit(server):
    """A page that redirects to itself is refused after MAX_REDIRECTS + 1 requests, not followed forever."""
    loop_response = head("302 Found", {"Location": "/loop", "Content-Length": "0"})
    server.routes["/loop"] = lambda writer: _write(writer, loop_response)
    error, _ = await refused(server.url("/loop"), InvalidImageError)
    assert error.code == "image_url_not_allowed"
    assert server.requests == ["/loop"] * (MAX_REDIRECTS + 1)
