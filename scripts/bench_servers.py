"""The servers scripts/bench.py starts: ours (either engine), `transformers serve` and `vllm serve`.

Each runs as a child process on a free loopback port, writes its log under the bench's log directory and is
stopped when the run ends. `start_*` return once the server answers its health probe.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "bench"  # the model name every server started here answers to
DEFAULT_START_TIMEOUT = 300.0  # vLLM on a CPU compiles for minutes: its starters are given more


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree_rss_mib(pid: int) -> float | None:
    """Resident memory of a process and all its descendants (vLLM's engine core is a child), from /proc."""
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/status", encoding="ascii") as status:
                total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as children:
                    pending += [int(child) for child in children.read().split()]
        except (OSError, ValueError):
            if current == pid:
                return None
    return round(total / 1024, 1)


class Server:
    """A server process on a loopback port, stopped when the run ends."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.url, self.command = name, f"http://127.0.0.1:{port}", command
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self._process.pid
        self.log_path = log

    def wait_ready(self, probe: str, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Wait for `probe` to answer 200; fail early if the process exits or reports a failed load."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            try:
                response = httpx.get(self.url + probe, timeout=5)
                if response.status_code == 200:
                    print(f"{self.name} ready after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
                    return
                if response.status_code == 503 and _failed(response):  # ours: the model did not load
                    raise RuntimeError(f"{self.name} failed to load: {response.text[:300]}; see {self.log_path}")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


def _failed(response: httpx.Response) -> bool:
    try:
        return response.json().get("status") == "failed"
    except ValueError:
        return False


def start(name: str, command: list[str], env: dict[str, str], port: int, log: Path, timeout: float) -> Server:
    """Start a server and wait for its /health; stop it again if it never gets there."""
    server = Server(name, command, env, port, log)
    try:
        server.wait_ready("/health", timeout)
    except BaseException:
        server.stop()
        raise
    return server


def ours_env(checkpoint: Path, port: int, max_batch_size: int, **settings: str) -> dict[str, str]:
    """The environment our server reads its settings from (see backend/settings.py)."""
    return {
        **os.environ,
        "MODEL_ID": str(checkpoint),
        "SERVED_MODEL_NAME": SERVED_NAME,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "warning",
        "MAX_BATCH_SIZE": str(max_batch_size),
        **settings,
    }


def start_ours(checkpoint: Path, max_batch_size: int, log_dir: Path) -> Server:
    """Our server in this interpreter, with the engine the environment (or ENGINE=auto) picks."""
    port = free_port()
    env = ours_env(checkpoint, port, max_batch_size)
    return start("ours", [sys.executable, "-m", "backend"], env, port, log_dir / "ours.log", DEFAULT_START_TIMEOUT)


def start_transformers_serve(checkpoint: Path, binary: str, continuous: bool, log_dir: Path) -> Server:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [binary, "serve", str(checkpoint), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"]
    if continuous:
        command.append("--continuous-batching")
    name = "transformers serve" + (" --continuous-batching" if continuous else "")
    log = log_dir / ("transformers-serve-cb.log" if continuous else "transformers-serve.log")
    return start(name, command, env, port, log, DEFAULT_START_TIMEOUT)


class VllmSetup:
    """What the three servers of `--vs-vllm` share, so that only the serving layer differs between
    `vllm serve` and ours with ENGINE=vllm: the same KV cache, context, batch size, image limits and pixel
    bounds, seed and prefix caching, and compilation (or `--enforce-eager`) on both."""

    def __init__(
        self,
        checkpoint: Path,
        log_dir: Path,
        *,
        vllm_python: str,
        transformers_python: str,
        max_num_seqs: int,
        kv_cache_gib: float = 2.0,
        max_model_len: int = 2048,
        max_queue: int = 256,
        enforce_eager: bool = False,
        start_timeout: float = 900.0,
        dtype: str = "auto",
    ) -> None:
        self.checkpoint, self.log_dir = checkpoint, log_dir
        self.vllm_python, self.transformers_python = vllm_python, transformers_python
        self.max_num_seqs, self.kv_cache_gib, self.max_model_len = max_num_seqs, kv_cache_gib, max_model_len
        self.max_queue, self.enforce_eager, self.start_timeout = max_queue, enforce_eager, start_timeout
        self.dtype = dtype  # both vLLM servers alike

    def kv_env(self) -> dict[str, str]:
        return {"VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}"}

    def peer_command(self, port: int) -> list[str]:
        """`vllm serve` (its module: the console script fails its own version lookup with vllm-cpu), with the
        options ours passes to vLLM's engine (backend/engines/vllm_engine/options.py) spelled out."""
        from backend.settings import Settings

        fields = Settings.model_fields
        images = fields["max_images_per_request"].default
        pixels = {"min_pixels": fields["min_pixels"].default, "max_pixels": fields["max_pixels"].default}
        command = [
            self.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.checkpoint),
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--seed", "0",
            "--dtype", self.dtype,
            "--limit-mm-per-prompt", f'{{"image": {images}, "video": 0}}',
            "--mm-processor-kwargs", f'{{"min_pixels": {pixels["min_pixels"]}, "max_pixels": {pixels["max_pixels"]}}}',
            "--uvicorn-log-level", "warning",
            "--enable-prefix-caching",  # flags after the options with values
        ]  # fmt: skip
        if self.enforce_eager:
            command.append("--enforce-eager")
        return command

    def ours_settings(self, engine: str) -> dict[str, str]:
        settings = {
            "ENGINE": engine,
            "MAX_MODEL_LEN": str(self.max_model_len),
            "MAX_QUEUE": str(self.max_queue),
        }
        if engine == "vllm":
            settings |= {"CPU_KV_CACHE_GIB": f"{self.kv_cache_gib:g}", "DTYPE": self.dtype, **self.kv_env()}
            if self.enforce_eager:
                settings["ENFORCE_EAGER"] = "true"
        return settings

    def start_peer(self, name: str) -> Server:
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.kv_env()}
        return start(name, self.peer_command(port), env, port, self.log_dir / "vllm-serve.log", self.start_timeout)

    def start_ours(self, name: str, engine: str) -> Server:
        port = free_port()
        env = ours_env(self.checkpoint, port, self.max_num_seqs, **self.ours_settings(engine))
        python = self.vllm_python if engine == "vllm" else self.transformers_python
        log = self.log_dir / f"ours-{engine}.log"
        return start(name, [python, "-m", "backend"], env, port, log, self.start_timeout)
