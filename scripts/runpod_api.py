"""A small client for RunPod's REST v2 API, used by `scripts/runpod.py` on the user's laptop.

It sends one request at a time with httpx and turns every failure into a `RunPodError` whose message says
what happened and what to do: 401 bad key, 402 no balance, 404 no such pod, 409 wrong state, 422 bad body,
400 "no capacity", 429 after honouring `Retry-After`, 5xx and network failures after retries. Errors from
the API are RFC 9457 problem objects (`{title, status, detail}`).

With `plan=True` nothing is sent: each request is printed (method, URL, headers with the key redacted, JSON
body with secrets redacted) and `request` returns None.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_API_URL = "https://api.runpod.io/v2"
# The pod's public HTTP address; overridable (RUNPOD_PROXY_URL) for tests and for proxies of one's own.
DEFAULT_PROXY_URL = "https://{pod_id}-{port}.proxy.runpod.net"
CONSOLE_KEYS_URL = "https://www.runpod.io/console/user/settings"
CONSOLE_BILLING_URL = "https://www.runpod.io/console/user/billing"
# The body RunPod answers when the GPU type asked for has no free machine (HTTP 400).
NO_CAPACITY_MARKER = "no longer any instances available"
HOST_BUSY_MARKER = "not enough free gpus"
# Environment variables of the pod whose values are secrets: redacted when a plan is printed.
SECRET_ENV_NAMES = ("API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RUNPOD_API_KEY")
MAX_RETRY_WAIT_SECONDS = 60.0
# user:token@ in a git URL (a private repository's clone URL) is a secret too.
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


class RunPodError(Exception):
    """A request that failed for good, with a message meant for the user."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.detail = detail


class NoCapacityError(RunPodError):
    """RunPod has no free GPU of the requested type (400 "no longer any instances available")."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (quotes stripped, comments and blank lines skipped); {} if absent."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def setting(name: str, env_file: dict[str, str], default: str = "") -> str:
    """A setting from the environment, else from the .env file, else the default."""
    return os.environ.get(name) or env_file.get(name) or default


def redact(value: str) -> str:
    """A secret as it may be shown: its last four characters at most."""
    if not value:
        return "<not set>"
    if value.startswith("<"):  # a placeholder of the plan, not a secret
        return value
    return f"<redacted …{value[-4:]}>" if len(value) >= 16 else "<redacted>"


def redact_body(body: Any) -> Any:
    """A copy of a request body with the pod's secret environment values redacted."""
    if not isinstance(body, dict):
        return body
    copy = dict(body)
    if isinstance(copy.get("env"), dict):
        copy["env"] = {
            k: redact(v) if k in SECRET_ENV_NAMES else URL_CREDENTIALS.sub("<redacted>@", v)
            for k, v in copy["env"].items()
        }
    return copy


def problem_detail(response: httpx.Response) -> str:
    """The human part of an RFC 9457 problem (detail, else title), or the start of a non-JSON body."""
    try:
        problem = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if not isinstance(problem, dict):
        return str(problem)[:200]
    detail = str(problem.get("detail") or problem.get("title") or problem.get("message") or "")
    errors = problem.get("errors")
    if isinstance(errors, list) and errors:
        detail += " (" + "; ".join(str(e.get("detail", e) if isinstance(e, dict) else e) for e in errors) + ")"
    return detail


def retry_after_seconds(response: httpx.Response, fallback: float) -> float:
    """The wait a 429/503 asks for (`Retry-After` in seconds or as an HTTP date), capped; else fallback."""
    header = response.headers.get("Retry-After", "").strip()
    if header:
        try:
            seconds = float(header)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = fallback
        return min(max(seconds, 0.0), MAX_RETRY_WAIT_SECONDS)
    return fallback


def explain(method: str, path: str, response: httpx.Response) -> RunPodError:
    """The error for a final failed response, with what to do about it."""
    status = response.status_code
    detail = problem_detail(response)
    said = f" RunPod said: {detail}" if detail else ""
    if status == 400 and NO_CAPACITY_MARKER in detail.lower():
        return NoCapacityError(f"No free GPU of that type right now (400).{said}", status, detail)
    if HOST_BUSY_MARKER in detail.lower():
        message = (
            f"The pod's host has no free GPU to resume on ({status}).{said}\n"
            "What to do: wait and try again, or terminate the pod and create a new one (new id, new URL; the "
            "model downloads again), or use a network volume next time so the pod can move hosts."
        )
        return RunPodError(message, status, detail)
    advice = {
        401: f"RunPod refused the API key. Check RUNPOD_API_KEY (environment or .env); keys are made at "
        f"{CONSOLE_KEYS_URL}.",
        403: f"The API key lacks permission for this. Give it read/write access to Pods at {CONSOLE_KEYS_URL}.",
        402: f"The account's balance is too low for this pod. Add credit at {CONSOLE_BILLING_URL}.",
        404: "No such pod. `python scripts/runpod.py status` lists yours.",
        409: "The action is not valid in the pod's current state; `python scripts/runpod.py status` shows it.",
        422: "RunPod rejected the request body; the field it names needs another value.",
        429: "RunPod kept rate-limiting these requests. Wait a minute and run the command again.",
    }.get(status)
    if advice is None and status >= 500:
        advice = "RunPod had a server error and kept having it after retries. Try again in a few minutes."
    return RunPodError(f"{method} {path} failed ({status}).{said}\nWhat to do: {advice or 'see above.'}", status, detail)


@dataclass
class RunPodClient:
    """RunPod REST v2 over httpx: retries, errors explained, and a plan mode that sends nothing."""

    api_key: str
    base_url: str = DEFAULT_API_URL
    plan: bool = False
    attempts: int = 4
    backoff_seconds: float = 1.0
    timeout_seconds: float = 30.0
    out: TextIO = field(default_factory=lambda: sys.stdout)
    sleep: Callable[[float], None] = time.sleep
    _http: httpx.Client | None = None

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.plan:
            if not self.api_key:
                raise RunPodError(
                    "RUNPOD_API_KEY is not set.\n"
                    f"What to do: create a key at {CONSOLE_KEYS_URL} and put RUNPOD_API_KEY=... in the "
                    "environment or in .env (use --plan to see the requests without a key)."
                )
            self._http = httpx.Client(
                headers={"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"},
                timeout=self.timeout_seconds,
            )

    def close(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            self._http.close()

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET a path under the base URL; the decoded JSON (None in plan mode)."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON body; the decoded JSON, None for an empty answer (or in plan mode)."""
        return self.request("POST", path, body=body)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, str] | None = None) -> Any:
        """Send one request, retrying what is safe to retry; raise RunPodError when it fails for good.

        GETs are retried on network errors, 429 and 5xx. POSTs create or change things, so they are retried
        only when RunPod certainly did not act: the connection failed before the request went out, or 429.
        """
        url = self.base_url + path
        if self.plan:
            self.print_plan(method, url, body, params)
            return None
        assert self._http is not None
        safe_to_repeat = method == "GET"
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            wait = self.backoff_seconds * 2 ** (attempt - 1)
            try:
                response = self._http.request(method, url, json=body, params=params)
            except httpx.TransportError as error:
                repeatable = safe_to_repeat or isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout))
                if last or not repeatable:
                    raise RunPodError(
                        f"Could not reach RunPod at {self.base_url} ({type(error).__name__}: {error}); "
                        f"tried {attempt} time(s).\nWhat to do: check the network connection (and "
                        "RUNPOD_API_URL), then run the command again; `status` shows whether a create went through."
                    ) from error
                print(f"  network error ({type(error).__name__}); retrying in {wait:g} s", file=sys.stderr)
                self.sleep(wait)
                continue
            retryable = response.status_code == 429 or (safe_to_repeat and response.status_code >= 500)
            if retryable and not last:
                wait = retry_after_seconds(response, wait)
                print(f"  RunPod answered {response.status_code}; retrying in {wait:g} s", file=sys.stderr)
                self.sleep(wait)
                continue
            if response.is_error:
                raise explain(method, path, response)
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError as error:
                raise RunPodError(f"{method} {path}: RunPod answered {response.status_code} with a body that is not "
                                  f"JSON: {response.text[:200]!r}. Is RUNPOD_API_URL right ({self.base_url})?") from error
        raise AssertionError("unreachable: the last attempt returns or raises")

    def print_plan(self, method: str, url: str, body: Any, params: dict[str, str] | None) -> None:
        """Print the request that would be sent, secrets redacted."""
        query = "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
        print(f"{method} {url}{query}", file=self.out)
        print(f"Authorization: Bearer {redact(self.api_key)}", file=self.out)
        if body is not None:
            print("Content-Type: application/json", file=self.out)
            print(json.dumps(redact_body(body), indent=2, ensure_ascii=False), file=self.out)
        print(file=self.out)
