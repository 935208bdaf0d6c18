"""Fetching an image from an http(s) URL, only where the operator allows it, and never into the pod.

Guards, each checked on every hop of a redirect chain:
- the scheme is http or https, and the host is in IMAGE_URL_ALLOWED_DOMAINS (a domain allows its subdomains);
- the host's addresses are resolved here and every one must be a public address: loopback, private,
  link-local (169.254.169.254, the cloud metadata service), shared, multicast and reserved ranges are refused
  (unless IMAGE_URL_ALLOW_PRIVATE_NETWORKS is set for an intranet image store);
- the connection goes to the address that was checked (TLS still verifies the host name), so a DNS answer
  that changes between the check and the connection cannot redirect it;
- one deadline for the whole fetch, at most 3 redirects, and the size cap enforced while the body streams.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from backend.errors import ImageTooLargeError, InvalidImageError

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchPolicy:
    """What the operator allows: domains, private networks, time and size."""

    allowed_domains: tuple[str, ...]
    allow_private_networks: bool
    timeout_seconds: float
    max_bytes: int

    def allows_host(self, host: str) -> bool:
        """Whether `host` is an allowed domain or a subdomain of one."""
        host = host.lower().rstrip(".")
        return any(host == domain or host.endswith("." + domain) for domain in self.allowed_domains)


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class ImageFetcher:
    """Downloads images under a FetchPolicy."""

    def __init__(self, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.policy = policy
        self._transport = transport

    async def fetch(self, url: str, source: str) -> bytes:
        """The bytes at `url`, or a 4xx error that names `source` and says which rule refused it."""
        if not self.policy.allowed_domains:
            raise InvalidImageError(
                f"The image at {source} is a web address, and this server does not fetch images from URLs "
                "(IMAGE_URL_ALLOWED_DOMAINS is empty). Send it inline as a data: URI or upload the file.",
                param=source,
                code="image_url_not_allowed",
            )
        deadline = time.monotonic() + self.policy.timeout_seconds
        try:
            async with httpx.AsyncClient(transport=self._transport, follow_redirects=False, trust_env=False) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    # The name lookup is inside the deadline too: a stalling resolver must not hold the request.
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                        address = await self._check(url, source)
                    response_or_next = await self._get(client, url, address, source, deadline)
                    if isinstance(response_or_next, bytes):
                        return response_or_next
                    url = response_or_next
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise InvalidImageError(
                f"Fetching the image at {source} took longer than {self.policy.timeout_seconds:g} s.",
                param=source,
                code="image_url_timeout",
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # The exception's text names the address connected to: not for the client's eyes.
            raise InvalidImageError(
                f"Could not fetch the image at {source} ({type(exc).__name__}).",
                param=source,
                code="image_url_unreachable",
            ) from exc
        raise InvalidImageError(
            f"The image URL at {source} redirected more than {MAX_REDIRECTS} times.",
            param=source,
            code="image_url_not_allowed",
        )

    async def _check(self, url: str, source: str) -> str:
        """Validate scheme, domain and resolved addresses; return the address to connect to."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port  # `port` raises for `:abc` or `:99999`
        except ValueError as exc:  # `http://[::1/`, a bad port
            raise InvalidImageError(
                f"The image URL at {source} is not a valid URL ({exc}).", param=source, code="invalid_image_url"
            ) from exc
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidImageError(
                f"The image URL at {source} must be http(s) with a host name.",
                param=source,
                code="image_url_not_allowed",
            )
        if not self.policy.allows_host(host):
            raise InvalidImageError(
                f"The image URL at {source} points to {host}, which is not in IMAGE_URL_ALLOWED_DOMAINS.",
                param=source,
                code="image_url_not_allowed",
            )
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError, ValueError) as exc:  # UnicodeError: an IDNA label over 63 chars
            raise InvalidImageError(
                f"The host {host} of the image URL at {source} does not resolve.",
                param=source,
                code="image_url_unreachable",
            ) from exc
        addresses = [info[4][0] for info in infos]
        if not self.policy.allow_private_networks:
            for address in addresses:
                if not is_public_address(address):
                    # Which address is not said: the answer must not map the pod's network for the client.
                    raise InvalidImageError(
                        f"The image URL at {source} resolves to a loopback, private, link-local or reserved "
                        "address; this server only fetches from public addresses.",
                        param=source,
                        code="image_url_not_allowed",
                    )
        return addresses[0]

    async def _get(self, client: httpx.AsyncClient, url: str, address: str, source: str, deadline: float):
        """One request to the checked address: the body bytes, or the URL of a redirect."""
        parts = urlsplit(url)
        target = httpx.URL(url)  # the host in its ASCII (IDNA) form, as Host and SNI need it
        host_for_url = f"[{address}]" if ":" in address else address
        netloc = host_for_url + (f":{parts.port}" if parts.port else "")
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {"Host": target.netloc.decode("ascii"), "Accept": "image/*"}
        sni = target.raw_host.decode("ascii")
        request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": sni})
        remaining = max(deadline - time.monotonic(), 0.001)
        async with asyncio.timeout(remaining):
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    return urljoin(url, response.headers.get("location", ""))
                if response.status_code != 200:
                    raise InvalidImageError(
                        f"Fetching the image at {source} answered HTTP {response.status_code}.",
                        param=source,
                        code="image_url_unreachable",
                    )
                declared = int(response.headers.get("content-length") or 0)
                if declared > self.policy.max_bytes:
                    raise self._too_large(source)
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > self.policy.max_bytes:
                        raise self._too_large(source)
                return bytes(body)
            finally:
                await response.aclose()

    def _too_large(self, source: str) -> ImageTooLargeError:
        return ImageTooLargeError(
            f"The image at {source} is larger than the limit of {self.policy.max_bytes} bytes (MAX_IMAGE_BYTES).",
            param=source,
        )
