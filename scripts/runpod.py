#!/usr/bin/env python3
"""Manage the ShizhenGPT pod on RunPod from your laptop, over RunPod's REST v2 API.

    python scripts/runpod.py create [--gpu ID ...] [--gpu-count N] [--engine auto|transformers|vllm]
                                    [--cloud SECURE|COMMUNITY] [--volume GB] [--wait]
    python scripts/runpod.py status [POD_ID]      a table: id, name, status, GPU, $/h, uptime, URL
    python scripts/runpod.py wait POD_ID          until /health answers "ready" through the proxy
    python scripts/runpod.py stop|start POD_ID
    python scripts/runpod.py terminate POD_ID [--yes]
    python scripts/runpod.py cost [--gpu ID ...]  hourly, daily, monthly and 8 h/day, storage included

`--plan` (before or after the command) prints every HTTP request the command would send, secrets
redacted, and sends nothing. RUNPOD_API_KEY comes from the environment or `.env`; RUNPOD_API_URL
overrides the API's address and RUNPOD_PROXY_URL the pods' public one (a template with {pod_id} and {port}).

Secrets never go on the command line, where every user of the machine sees them in the process list and
the shell keeps them in its history: the server's API_KEY and HF_TOKEN come from the environment or `.env`
(else, for API_KEY, a hidden prompt on a terminal or a generated key; for HF_TOKEN, `--ask-hf-token`).
Needs only Python 3.11 and httpx.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from runpod_api import (
    DEFAULT_API_URL,
    DEFAULT_PROXY_URL,
    URL_CREDENTIALS,
    NoCapacityError,
    RunPodClient,
    RunPodError,
    read_env_file,
    setting,
)
from runpod_report import (
    SERVER_PORT,
    catalog_gpus,
    format_table,
    gpu_price,
    gpu_stock,
    hourly_cost,
    monthly_costs,
    pod_row,
    proxy_url,
)

ROOT = Path(__file__).resolve().parent.parent
GPU_PREFERENCE = ["NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
DEFAULT_IMAGE = "runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04"
DEFAULT_MODEL = "FreedomIntelligence/ShizhenGPT-32B-VL"
CODE_DIR = "/workspace/shizhen-server"
# RunPod's list prices for storage, in $ per GB-month (autumn 2026); override with the --*-price flags.
VOLUME_PRICE_RUNNING, VOLUME_PRICE_STOPPED, DISK_PRICE_RUNNING = 0.10, 0.20, 0.10
FAILED_STATES = {"ERROR", "TERMINATED", "EXITED"}

# What the pod runs at every (re)start: RunPod's own start script (SSH) in the background, then the code
# cloned onto the volume once, then deploy_runpod.sh (setup and download are no-ops when done). The container
# stays up when the deploy fails, so that you can SSH in and read /workspace/deploy.log.
START_SCRIPT = (
    "if [ -x /start.sh ]; then /start.sh & fi; "
    'if [ ! -d "$SHIZHEN_DIR/.git" ]; then git clone --branch "$SHIZHEN_REF" "$SHIZHEN_REPO" "$SHIZHEN_DIR"; fi; '
    'cd "$SHIZHEN_DIR" && ./deploy_runpod.sh >>/workspace/deploy.log 2>&1 '
    '|| echo "deploy failed: see /workspace/deploy.log" >>/workspace/deploy.log; '
    "sleep infinity"
)


def origin_url() -> str:
    """This checkout's `origin` remote when a pod could clone it (https or ssh), else ''."""
    try:
        url = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], check=False,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return url if url.startswith(("https://", "http://", "git@", "ssh://")) else ""


def has_credentials(url: str) -> bool:
    """Whether a git URL carries a secret: user:password@ anywhere, or any user@ over http(s).

    Over http(s) a bare `user@` is how tokens are usually passed (`https://ghp_...@github.com/...`), so it
    counts; `ssh://git@host/...` and `git@host:...` name an SSH user, not a secret.
    """
    try:
        parts = urlsplit(url)
        password, username = parts.password, parts.username
    except ValueError:
        return bool(URL_CREDENTIALS.search(url))
    return password is not None or (parts.scheme in ("http", "https") and bool(username))


def redact_url(url: str) -> str:
    """A git URL as it may be shown: its user and token replaced."""
    return URL_CREDENTIALS.sub("<redacted>@", url)


def choose_repo(args: argparse.Namespace, plan: bool) -> str | None:
    """The URL the pod clones, with a warning when it carries a token; None (after an error) when refused.

    `--repo` or SHIZHEN_REPO is the operator's explicit choice. `origin` is a guess, and one with a token in
    it would put that token in the pod's environment and on its volume without anyone deciding so.
    """
    explicit = args.repo or setting("SHIZHEN_REPO", args.env_file)
    repo = explicit or origin_url()
    if repo and has_credentials(repo):
        where = ("the pod's environment (SHIZHEN_REPO: the RunPod console and every process on the pod see it) "
                 f"and {CODE_DIR}/.git/config on its volume")
        if not explicit:
            print(f"ERROR: the `origin` remote carries credentials ({redact_url(repo)}); they are not copied to "
                  "the pod without being asked.\n"
                  "What to do: pass --repo URL (or set SHIZHEN_REPO) explicitly: a public URL, or one with a "
                  f"read-only token, knowing that the token will be stored in {where}.", file=sys.stderr)
            return None
        print(f"WARNING: the repository URL carries credentials ({redact_url(repo)}): the token will be stored in "
              f"{where}. Use a read-only token limited to this repository.", file=sys.stderr)
    if not repo:
        if not plan:
            print("ERROR: no git URL for the pod to clone the server from.\n"
                  "What to do: pass --repo https://github.com/you/shizhen-server.git (a URL the pod can reach).",
                  file=sys.stderr)
            return None
        repo = "<your repository URL: --repo>"
    return repo


def read_secret(prompt: str) -> str:
    """A secret typed at a hidden prompt on a terminal, else the first line of stdin (piped from a vault)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    try:
        return getpass.getpass(prompt).strip()
    except EOFError:  # Ctrl-D: no answer
        return ""


def choose_server_key(args: argparse.Namespace, plan: bool) -> tuple[str, bool]:
    """The server's API_KEY and whether it was generated here (and so must be shown once).

    From the environment or .env; else asked at a hidden prompt when a person is at a terminal (Enter
    generates one); else generated, as a script run needs no answer.
    """
    key = setting("API_KEY", args.env_file)
    if key:
        return key, False
    if plan:
        return "<generated at creation>", True
    if sys.stdin.isatty():  # a person is there to ask; a script is not, and gets a generated key
        key = read_secret("The server's API key (API_KEY is not set; press Enter to generate one): ")
        if key:
            return key, False
    return "sk-" + secrets.token_urlsafe(32), True


def choose_hf_token(args: argparse.Namespace, plan: bool) -> str:
    """HF_TOKEN for the pod: asked for with --ask-hf-token, else from the environment or .env ('' if none)."""
    if args.ask_hf_token:
        if plan:
            return "<asked at creation>"
        token = read_secret("HF_TOKEN (read-only Hugging Face token): ")
        if not token:
            raise RunPodError("--ask-hf-token was given but no token was entered.\n"
                              "What to do: type or pipe the token, or leave out --ask-hf-token.")
        return token
    token = setting("HF_TOKEN", args.env_file)
    if token:
        # Said aloud because HF_TOKEN may be in the environment for other reasons, possibly with write access.
        print("HF_TOKEN from your environment or .env goes into the pod's environment; "
              "a read-only token is enough.", file=sys.stderr)
    return token


class RemovedSecretOption(argparse.Action):
    """A removed option that took a secret: refuse it, naming the environment variable to use instead.

    It fails rather than being ignored, so that a script still passing it breaks loudly instead of leaving the
    secret in the process list and the shell history and then running with another key.
    """

    def __init__(self, option_strings: list[str], dest: str, variable: str = "", hint: str = "", **kwargs: Any):
        self.variable, self.hint = variable, hint
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        # The value is never repeated in the message: it is the secret.
        parser.error(f"{option_string} was removed: a secret on the command line is visible to every user in the "
                     f"process list and stays in the shell history. Set {self.variable} in the environment or in "
                     f".env instead{self.hint}.")


def engine_settings(args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """The pod's ENGINE and TENSOR_PARALLEL_SIZE for `--engine` and `--gpu-count`, and a line to tell the user.

    Several GPUs are worth paying for only if the model is split across them so that they work at once, which
    is vLLM's tensor parallelism: the transformers engine has none. So `--gpu-count N` (N > 1) means vLLM
    with TENSOR_PARALLEL_SIZE=N, unless `--engine transformers` asks otherwise (it spreads the layers over the
    GPUs, which then work one after another). One GPU: ENGINE as given, else unset (the server's `auto`).
    """
    count = args.gpu_count
    if count <= 1:
        return ({"ENGINE": args.engine} if args.engine else {}), None
    if args.engine == "transformers":
        return {"ENGINE": "transformers"}, (
            f"--gpu-count {count} with --engine transformers: the layers are spread over the {count} GPUs, which "
            "work one after another (the transformers engine has no tensor parallelism); --engine vllm uses them "
            "together.")
    return {"ENGINE": "vllm", "TENSOR_PARALLEL_SIZE": str(count)}, (
        f"--gpu-count {count}: ENGINE=vllm with TENSOR_PARALLEL_SIZE={count}, the model split across the {count} "
        "GPUs (the transformers engine cannot do tensor parallelism).")


def pod_request(args: argparse.Namespace, gpu_id: str, server_key: str, repo: str,
                hf_token: str = "") -> dict[str, Any]:
    """The body of `POST /pods` for one GPU type."""
    env = {
        "MODEL_ID": args.model,
        "API_KEY": server_key,
        "HF_HOME": "/workspace/models",
        "HOST": "0.0.0.0",
        "PORT": str(SERVER_PORT),
        "SHIZHEN_REPO": repo,
        "SHIZHEN_REF": args.ref,
        "SHIZHEN_DIR": CODE_DIR,
        **engine_settings(args)[0],
    }
    if hf_token:
        env["HF_TOKEN"] = hf_token
    if args.network_volume:
        mounts: dict[str, Any] = {"network": [{"volumeId": args.network_volume, "path": "/workspace"}]}
    else:
        mounts = {"persistent": {"size": args.volume, "path": "/workspace"}}
    body: dict[str, Any] = {
        "name": args.name,
        "image": args.image,
        "gpu": {"id": gpu_id, "count": args.gpu_count},
        "cloud": args.cloud,
        "disk": args.disk,
        "ports": [f"{SERVER_PORT}/http", "22/tcp"],
        "env": env,
        "mounts": mounts,
        "args": f"bash -c '{START_SCRIPT}'",
    }
    if args.data_center:
        body["dataCenterIds"] = args.data_center
    return body


def cmd_create(client: RunPodClient, args: argparse.Namespace) -> int:
    """Create the pod on the first GPU type of the preference list that has capacity."""
    repo = choose_repo(args, client.plan)
    if repo is None:
        return 2
    server_key, generated = choose_server_key(args, client.plan)
    args.server_key = server_key  # for `--wait`, which reads /health's details with it
    hf_token = choose_hf_token(args, client.plan)
    note = engine_settings(args)[1]
    if note:
        print(note, file=sys.stderr)  # stderr: stdout stays the plan's requests, or the pod's details
    gpus = args.gpu or GPU_PREFERENCE
    for index, gpu_id in enumerate(gpus):
        if client.plan and index:
            print(f"# only if the request above gets 400 \"no capacity\": the same body with gpu.id = {gpu_id!r}")
            continue
        try:
            pod = client.post("/pods", pod_request(args, gpu_id, server_key, repo, hf_token))
        except NoCapacityError:
            following = f"; trying {gpus[index + 1]}" if index + 1 < len(gpus) else ""
            print(f"no capacity for {gpu_id} in the {args.cloud} cloud{following}", file=sys.stderr)
            continue
        if pod is None:  # plan mode
            continue
        url = proxy_url(args.proxy_template, pod["id"])
        print(f"created pod {pod['id']} ({pod.get('name', args.name)}) on {gpu_id}, {args.cloud} cloud, "
              f"status {pod.get('status', '?')}")
        cost = hourly_cost(pod)
        if cost is not None:
            print(f"cost: ${cost:.2f}/h while running, plus storage")
        print(f"URL (once the model is loaded): {url}")
        if generated:
            print(f"The server's API key, generated now and shown only once:\n  {server_key}")
        print(f"Next: python scripts/runpod.py wait {pod['id']}")
        if args.wait:
            return wait_until_ready(client, args, pod["id"])
        return 0
    if client.plan:
        return 0
    print(f"ERROR: none of {', '.join(gpus)} has free capacity in the {args.cloud} cloud right now.\n"
          "What to do: try again in a few minutes, add --cloud COMMUNITY, or list other GPUs with --gpu "
          "(`python scripts/runpod.py cost --gpu ...` shows their stock).", file=sys.stderr)
    return 3


def list_pods(client: RunPodClient, pod_id: str | None) -> list[dict[str, Any]] | None:
    """One pod, or all of them (None in plan mode)."""
    if pod_id:
        pod = client.get(f"/pods/{pod_id}")
        return None if pod is None else [pod]
    answer = client.get("/pods")
    if answer is None:
        return None
    return answer.get("pods", []) if isinstance(answer, dict) else answer


def cmd_status(client: RunPodClient, args: argparse.Namespace) -> int:
    """Print the pods as a table."""
    pods = list_pods(client, args.pod_id)
    if pods is None:
        return 0
    if not pods:
        print("No pods. `python scripts/runpod.py create` makes one.")
        return 0
    now = datetime.now(UTC)
    header = ["ID", "NAME", "STATUS", "GPU", "$/H", "UPTIME", "URL"]
    print(format_table(header, [pod_row(pod, args.proxy_template, now) for pod in pods]))
    return 0


ACTION_DONE = {
    "stop": "stopped: the GPU is released; the volume (model cache, venv, code) stays and is billed as storage",
    "start": "starting: the pod runs deploy_runpod.sh again, which finds the model on the volume",
}


def cmd_action(client: RunPodClient, args: argparse.Namespace) -> int:
    """stop or start a pod."""
    pod = client.post(f"/pods/{args.pod_id}/action", {"action": args.command})
    if pod is not None:
        print(f"{args.pod_id}: {ACTION_DONE[args.command]} (status {pod.get('status', '?')})")
        if args.command == "start":
            print(f"Next: python scripts/runpod.py wait {args.pod_id}")
    return 0


def cmd_terminate(client: RunPodClient, args: argparse.Namespace) -> int:
    """Terminate a pod for good, after asking unless --yes."""
    if not args.yes and not client.plan:
        try:
            answer = input(f"Terminate pod {args.pod_id}? Its volume, with the cached model, is deleted. [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not terminated")
            return 1
    client.post(f"/pods/{args.pod_id}/action", {"action": "terminate"})
    if not client.plan:
        print(f"{args.pod_id}: terminated; billing for it has ended")
    return 0


def wait_until_ready(client: RunPodClient, args: argparse.Namespace, pod_id: str) -> int:
    """Poll the pod until RUNNING, then its /health through the proxy until the model is ready."""
    url = proxy_url(args.proxy_template, pod_id)
    deadline = time.monotonic() + args.timeout
    seen = ""
    while True:
        pod = client.get(f"/pods/{pod_id}")
        if pod is None:  # plan mode
            print(f"# then, once the pod is RUNNING: GET {url}/health until it answers 200 \"ready\"")
            return 0
        status = pod.get("status", "?")
        if status != seen:
            print(f"pod {pod_id}: {status}")
            seen = status
        if status in FAILED_STATES:
            print(f"ERROR: the pod is {status}.\nWhat to do: `python scripts/runpod.py start {pod_id}`, or look at "
                  "its logs in the RunPod console.", file=sys.stderr)
            return 1
        if status == "RUNNING":
            break
        if time.monotonic() > deadline:
            print(f"ERROR: the pod is still {status} after {args.timeout:g} s.", file=sys.stderr)
            return 1
        time.sleep(args.interval)
    return wait_for_health(url, deadline, args)


def wait_for_health(url: str, deadline: float, args: argparse.Namespace) -> int:
    """Poll {url}/health until "ready"; show each change (proxy error, loading, download progress)."""
    seen = ""
    # With keys set, the server shows a caller without one only the status: the key shows why a load failed.
    key = getattr(args, "server_key", None) or setting("API_KEY", args.env_file)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=15, headers=headers) as http:
        while True:
            try:
                response = http.get(f"{url}/health")
                body = response.json() if "json" in response.headers.get("content-type", "") else {}
                state = str(body.get("status") or f"HTTP {response.status_code}")
            except httpx.HTTPError as error:
                response, body, state = None, {}, f"unreachable ({type(error).__name__})"
            if state != seen:
                hint = " (the proxy answers this until the server listens)" if state.startswith("HTTP 5") else ""
                print(f"{url}/health: {state}{hint}")
                seen = state
            if response is not None and response.status_code == 200 and state == "ready":
                print(f"ready: {url}\n  curl {url}/v1/models -H \"Authorization: Bearer $API_KEY\"\n"
                      f"  web chat: {url}/")
                return 0
            if state == "error":
                print(f"ERROR: the model failed to load: {body.get('error') or body}\n"
                      "What to do: SSH into the pod and run ./deploy_runpod.sh logs in "
                      f"{CODE_DIR}.", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"ERROR: not ready after {args.timeout:g} s (last: {state}).\nWhat to do: the first start "
                      "downloads ~64 GB; `wait` again, or SSH in and run ./deploy_runpod.sh logs.", file=sys.stderr)
                return 1
            time.sleep(args.interval)


def cmd_wait(client: RunPodClient, args: argparse.Namespace) -> int:
    """Wait until the pod's server is ready."""
    return wait_until_ready(client, args, args.pod_id)


def cmd_cost(client: RunPodClient, args: argparse.Namespace) -> int:
    """Print what the chosen GPUs cost from the live catalog, storage included."""
    catalog = client.get("/catalog/gpus", params={"include": "AVAILABILITY", "product": "POD"})
    if catalog is None:
        return 0
    entries = {entry.get("id"): entry for entry in catalog_gpus(catalog)}
    prices = (args.volume_price, args.volume_stopped_price, args.disk_price)
    rows = []
    for gpu_id in args.gpu or GPU_PREFERENCE:
        entry = entries.get(gpu_id)
        hourly = gpu_price(entry, args.cloud) if entry else None
        if hourly is None:
            rows.append([gpu_id, args.cloud, gpu_stock(entry or {}, args.cloud), "not offered", "-", "-", "-"])
            continue
        hourly *= args.gpu_count
        cost = monthly_costs(hourly, args.volume, args.disk, prices)
        rows.append([gpu_id, args.cloud, gpu_stock(entry, args.cloud), f"{hourly:.2f}", f"{cost['day']:.2f}",
                     f"{cost['month']:.0f}", f"{cost['month_8h']:.0f}"])
    header = ["GPU", "CLOUD", "STOCK", "GPU $/H", "$/DAY 24H", "$/MONTH 24/7", "$/MONTH 8H/DAY"]
    print(format_table(header, rows))
    stopped = args.volume * args.volume_stopped_price
    print(f"\nStorage included: {args.volume} GB volume at ${args.volume_price:.2f}/GB-month running and "
          f"${args.volume_stopped_price:.2f} stopped, {args.disk} GB container disk at ${args.disk_price:.2f} "
          f"while running.\nA stopped pod costs ${stopped:.2f}/month for its volume; a terminated one nothing. "
          "Billing is per second.")
    return 0


def gpu_count(text: str) -> int:
    """`--gpu-count`: a whole number of GPUs, at least 1 (refused here rather than by RunPod after a request)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GPUs (1, 2, 4 ...)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per action, `--plan` accepted before or after it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plan", action="store_true", default=argparse.SUPPRESS,
                        help="print the HTTP requests, secrets redacted, and send nothing")
    sizing = argparse.ArgumentParser(add_help=False)
    sizing.add_argument("--gpu", action="append", metavar="ID",
                        help=f"GPU type id, in order of preference (repeat; default: {', '.join(GPU_PREFERENCE)})")
    sizing.add_argument("--gpu-count", type=gpu_count, default=1, metavar="N",
                        help="GPUs per pod (default 1); create: N > 1 serves on vLLM with TENSOR_PARALLEL_SIZE=N")
    sizing.add_argument("--cloud", choices=["SECURE", "COMMUNITY"], default="SECURE")
    sizing.add_argument("--volume", type=int, default=100, metavar="GB",
                        help="persistent volume at /workspace (model cache, venv, code; default 100)")
    sizing.add_argument("--disk", type=int, default=40, metavar="GB", help="container disk (default 40)")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--timeout", type=float, default=3600, metavar="S", help="give up after (default 3600)")
    waiting.add_argument("--interval", type=float, default=5, metavar="S", help="poll every (default 5)")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = commands.add_parser("create", parents=[common, sizing, waiting], help="create the pod")
    create.add_argument("--name", default="shizhengpt")
    create.add_argument("--model", default=DEFAULT_MODEL, help=f"MODEL_ID to serve (default {DEFAULT_MODEL})")
    create.add_argument("--image", default=DEFAULT_IMAGE, help="container image with CUDA and torch")
    create.add_argument("--repo", help="git URL of this server for the pod to clone (default: SHIZHEN_REPO, else "
                        "origin unless it carries a token); a token in it ends up in the pod's env and .git/config")
    create.add_argument("--ref", default="main", help="branch or tag to clone (default main)")
    create.add_argument("--engine", choices=["auto", "transformers", "vllm"],
                        help="the pod's ENGINE (default: vllm with --gpu-count > 1, else unset, i.e. auto)")
    create.add_argument("--ask-hf-token", action="store_true",
                        help="read HF_TOKEN (gated models) at a hidden prompt, or from stdin when piped "
                             "(default: HF_TOKEN from env/.env)")
    # The server's key comes from API_KEY (env/.env, else a prompt or a new one), never from argv.
    create.add_argument("--server-key", action=RemovedSecretOption, variable="API_KEY",
                        hint=" (without it, create asks at a hidden prompt on a terminal, or generates one)")
    create.add_argument("--hf-token", action=RemovedSecretOption, variable="HF_TOKEN",
                        hint=", or pass --ask-hf-token to type it at a hidden prompt")
    create.add_argument("--network-volume", metavar="ID", help="mount this network volume instead of a volume")
    create.add_argument("--data-center", action="append", metavar="ID", help="allowed data center (repeat)")
    create.add_argument("--wait", action="store_true", help="then wait until the server is ready")
    status = commands.add_parser("status", parents=[common], help="list pods (or one)")
    status.add_argument("pod_id", nargs="?")
    for name, text in (("start", "start a stopped pod"), ("stop", "stop a pod, keeping its volume")):
        commands.add_parser(name, parents=[common], help=text).add_argument("pod_id")
    terminate = commands.add_parser("terminate", parents=[common], help="delete a pod and its volume")
    terminate.add_argument("pod_id")
    terminate.add_argument("--yes", action="store_true", help="do not ask")
    commands.add_parser("wait", parents=[common, waiting], help="wait until /health is ready").add_argument("pod_id")
    cost = commands.add_parser("cost", parents=[common, sizing], help="prices from the live catalog")
    cost.add_argument("--volume-price", type=float, default=VOLUME_PRICE_RUNNING, metavar="$")
    cost.add_argument("--volume-stopped-price", type=float, default=VOLUME_PRICE_STOPPED, metavar="$")
    cost.add_argument("--disk-price", type=float, default=DISK_PRICE_RUNNING, metavar="$")
    return parser


COMMANDS = {"create": cmd_create, "status": cmd_status, "start": cmd_action, "stop": cmd_action,
            "terminate": cmd_terminate, "wait": cmd_wait, "cost": cmd_cost}


def main(argv: list[str] | None = None) -> int:
    """Run one command; RunPod errors end with their explanation and exit status 1."""
    args = build_parser().parse_args(argv)
    env_file = args.env_file = read_env_file(Path.cwd() / ".env")  # read once; commands take it from args
    args.proxy_template = setting("RUNPOD_PROXY_URL", env_file, DEFAULT_PROXY_URL)
    try:
        client = RunPodClient(
            api_key=setting("RUNPOD_API_KEY", env_file),
            base_url=setting("RUNPOD_API_URL", env_file, DEFAULT_API_URL),
            plan=getattr(args, "plan", False),
        )
    except RunPodError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    try:
        return COMMANDS[args.command](client, args)
    except RunPodError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
