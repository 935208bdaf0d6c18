"""Which `Host` names the server answers to, and which web pages may call it (DNS rebinding, cross-site use).

A server on 127.0.0.1 with no key is reachable from any web page the user opens: a page can POST to it
(a form upload is a "simple" request that needs no CORS preflight, so the request runs even though the page
cannot read the answer), and a page on a domain that the attacker re-points to 127.0.0.1 (DNS rebinding)
is even same-origin with it. Two checks close this:
- `Host` must be a name the server is meant to answer to: an IP address (a rebinding attack always sends
  its own domain name), `localhost`, the RunPod proxy name of this pod, or a name in ALLOWED_HOSTS (`*`
  allows any; `*.example.com` a domain and its subdomains). Otherwise 400 `invalid_host`.
- A request that carries `Origin` (browsers add it to every cross-origin request, and to same-origin POSTs)
  must come from the server's own origin or from one listed in CORS_ORIGINS. Otherwise 403
  `origin_not_allowed`. Clients that are not browsers send no `Origin` and are not affected.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from backend.errors import error_body
from backend.middleware import send_error

RUNPOD_PROXY_DOMAIN = "proxy.runpod.net"


@dataclass(frozen=True)
class HostPolicy:
    """The names and origins the server accepts (built from settings by `from_settings`)."""

    allowed_hosts: tuple[str, ...] = ()  # exact names, `*.domain` patterns, or `*`
    cors_origins: tuple[str, ...] = ()  # origins of other sites allowed to call; `*` = any
    proxy_hosts: tuple[str, ...] = ()  # this pod's RunPod proxy names

    @classmethod
    def from_settings(
        cls, allowed_hosts: list[str], cors_origins: list[str], runpod_pod_id: str | None, ports: list[int]
    ) -> HostPolicy:
        """The policy for a server on `ports`; on RunPod (`RUNPOD_POD_ID`), its proxy names are accepted."""
        proxy = (
            tuple(f"{runpod_pod_id}-{port}.{RUNPOD_PROXY_DOMAIN}".lower() for port in ports) if runpod_pod_id else ()
        )
        return cls(
            tuple(host.lower().rstrip(".") for host in allowed_hosts),
            tuple(origin.rstrip("/").lower() for origin in cors_origins),
            proxy,
        )

    def host_allowed(self, host_header: str) -> bool:
        """Whether a `Host` header (name or address, with or without port) is one this server answers to."""
        name = split_host(host_header)
        if not name or _is_ip_address(name) or name == "localhost" or name in self.proxy_hosts:
            return True
        return any(_matches(name, pattern) for pattern in self.allowed_hosts)

    def origin_allowed(self, origin: str, host_header: str, forwarded_host: str) -> bool:
        """Whether a page at `origin` may call: the server's own origin, or one listed in CORS_ORIGINS."""
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # `null` (sandboxed frames, file: pages) and other schemes are never our own page
        own = {_strip_default_port(value.strip().lower()) for value in (host_header, forwarded_host) if value}
        return _strip_default_port(parts.netloc) in own or parts.hostname in self.proxy_hosts


def split_host(host_header: str) -> str:
    """The name or address of a `Host` header, lower case, without port or brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _matches(name: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name == pattern[2:] or name.endswith(pattern[1:])
    return name == pattern


def _strip_default_port(netloc: str) -> str:
    for default in (":80", ":443"):
        if netloc.endswith(default):
            return netloc[: -len(default)]
    return netloc


class HostGuardMiddleware:
    """Refuse requests for foreign `Host` names (400) and from foreign web pages (403), before any work."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.policy.host_allowed(host):
            return await self._refuse(
                scope,
                send,
                400,
                f"This server does not answer to the host name {split_host(host)!r}; add it to ALLOWED_HOSTS "
                "if it is yours.",
                "invalid_host",
            )
        origin = headers.get(b"origin")
        forwarded = headers.get(b"x-forwarded-host", b"").decode("latin-1").split(",")[0]
        if origin is not None and scope["method"] != "OPTIONS":
            if not self.policy.origin_allowed(origin.decode("latin-1"), host, forwarded):
                return await self._refuse(
                    scope,
                    send,
                    403,
                    "Requests from other web sites' pages are not allowed; list the page's origin in CORS_ORIGINS "
                    "to allow it.",
                    "origin_not_allowed",
                )
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, message: str, code: str) -> None:
        scope.setdefault("state", {}).setdefault("log", {})["refused"] = code
        await send_error(send, status, error_body(message, "invalid_request_error", code=code))
