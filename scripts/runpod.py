#!/usr/bin/env python3
"""Manage the ShizhenGPT pod on RunPod from your laptop, over RunPod's REST v2 API.

    python scripts/runpod.py create [--gpu ID ...] [--cloud SECURE|COMMUNITY] [--volume GB] [--wait]
    python scripts/runpod.py status [POD_ID]      a table: id, name, status, GPU, $/h, uptime, URL
    python scripts/runpod.py wait POD_ID          until /health answers "ready" through the proxy
    python scripts/runpod.py stop|start POD_ID
    python scripts/runpod.py terminate POD_ID [--yes]
    python scripts/runpod.py cost [--gpu ID ...]  hourly, daily, monthly and 8 h/day, storage included

`--plan` (before or after the command) prints every HTTP request the command would send, secrets
redacted, and sends nothing. RUNPOD_API_KEY comes from the environment or `.env`; RUNPOD_API_URL
overrides the API's address and RUNPOD_PROXY_URL the pods' public one (a template with {pod_id} and {port}).
Needs only Python 3.11 and httpx.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from runpod_api import (
    DEFAULT_API_URL,
    DEFAULT_PROXY_URL,
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


def pod_request(args: argparse.Namespace, gpu_id: str, server_key: str, repo: str) -> dict[str, Any]:
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
    }
    if args.hf_token:
        env["HF_TOKEN"] = args.hf_token
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
    server_key = args.server_key or setting("API_KEY", args.env_file)
    generated = not server_key
    if generated:
        server_key = "<generated at creation>" if client.plan else "sk-" + secrets.token_urlsafe(32)
    repo = args.repo or setting("SHIZHEN_REPO", args.env_file) or origin_url()
    if not repo:
        if not client.plan:
            print("ERROR: no git URL for the pod to clone the server from.\n"
                  "What to do: pass --repo https://github.com/you/shizhen-server.git (a URL the pod can reach).",
                  file=sys.stderr)
            return 2
        repo = "<your repository URL: --repo>"
    gpus = args.gpu or GPU_PREFERENCE
    for index, gpu_id in enumerate(gpus):
        if client.plan and index:
            print(f"# only if the request above gets 400 \"no capacity\": the same body with gpu.id = {gpu_id!r}")
            continue
        try:
            pod = client.post("/pods", pod_request(args, gpu_id, server_key, repo))
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
    with httpx.Client(timeout=15) as http:
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


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per action, `--plan` accepted before or after it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plan", action="store_true", default=argparse.SUPPRESS,
                        help="print the HTTP requests, secrets redacted, and send nothing")
    sizing = argparse.ArgumentParser(add_help=False)
    sizing.add_argument("--gpu", action="append", metavar="ID",
                        help=f"GPU type id, in order of preference (repeat; default: {', '.join(GPU_PREFERENCE)})")
    sizing.add_argument("--gpu-count", type=int, default=1)
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
    create.add_argument("--repo", help="git URL of this server for the pod to clone (default: origin)")
    create.add_argument("--ref", default="main", help="branch or tag to clone (default main)")
    create.add_argument("--server-key", help="the server's API_KEY (default: API_KEY from env/.env, else new)")
    create.add_argument("--hf-token", help="HF_TOKEN for gated models")
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
