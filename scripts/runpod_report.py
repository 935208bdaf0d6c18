"""What `scripts/runpod.py` shows: the pod table and the cost figures, from RunPod v2 answers.

Pure functions of the decoded JSON, tolerant of the shapes the API has used (a pod's `cost` as a number or
an object; catalog prices as `securePrice`/`communityPrice` or a `prices` object).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

SERVER_PORT = 8000
HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


def proxy_url(template: str, pod_id: str, port: int = SERVER_PORT) -> str:
    """The pod's public address for an HTTP port."""
    return template.format(pod_id=pod_id, port=port).rstrip("/")


def hourly_cost(pod: dict[str, Any]) -> float | None:
    """The pod's $/h, whether `cost` is a number or an object with a per-hour figure."""
    cost = pod.get("cost", pod.get("costPerHr"))
    if isinstance(cost, dict):
        cost = cost.get("perHour", cost.get("hourly"))
    try:
        return float(cost) if cost is not None else None
    except (TypeError, ValueError):
        return None


def uptime_seconds(pod: dict[str, Any], now: datetime) -> float | None:
    """How long a running pod has been up: the runtime's figure, else since `lastStartedAt`."""
    if pod.get("status") != "RUNNING":
        return None
    runtime = pod.get("runtime") or {}
    if runtime.get("uptimeInSeconds") is not None:
        return float(runtime["uptimeInSeconds"])
    started = pod.get("lastStartedAt")
    if not started:
        return None
    try:
        return (now - datetime.fromisoformat(started)).total_seconds()
    except ValueError:
        return None


def format_duration(seconds: float | None) -> str:
    """1d 2h, 3h 4m or 5m 6s; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {seconds % 60}s"


def pod_row(pod: dict[str, Any], template: str, now: datetime) -> list[str]:
    """One line of the status table."""
    gpu = pod.get("gpu") or {}
    gpu_name = gpu.get("displayName") or gpu.get("id") or "-"
    if gpu.get("count", 1) > 1:
        gpu_name = f"{gpu['count']}x {gpu_name}"
    # A stopped pod pays for its volume only, so its GPU rate would mislead.
    cost = hourly_cost(pod) if pod.get("status") not in ("EXITED", "TERMINATED") else None
    exposes_http = f"{SERVER_PORT}/http" in (pod.get("ports") or [])
    url = proxy_url(template, pod["id"]) if exposes_http and pod.get("status") != "TERMINATED" else "-"
    return [pod["id"], pod.get("name", "-"), pod.get("status", "?"), gpu_name,
            f"{cost:.2f}" if cost is not None else "-", format_duration(uptime_seconds(pod, now)), url]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def catalog_gpus(catalog: Any) -> list[dict[str, Any]]:
    """The GPU entries of a catalog answer, whether a bare list or wrapped in `gpus`/`data`."""
    if isinstance(catalog, dict):
        catalog = catalog.get("gpus", catalog.get("data", []))
    return [entry for entry in catalog or [] if isinstance(entry, dict)]


def gpu_price(entry: dict[str, Any], cloud: str) -> float | None:
    """A catalog entry's on-demand $/GPU-hour in a cloud (`securePrice`/`communityPrice` or `prices`)."""
    price = entry.get(f"{cloud.lower()}Price")
    if price is None:
        prices = entry.get("prices") or entry.get("pricing") or {}
        price = prices.get(cloud) or prices.get(cloud.lower())
    return float(price) if price else None


def gpu_stock(entry: dict[str, Any], cloud: str) -> str:
    """Stock of a GPU type in a cloud as the catalog says it (HIGH/MEDIUM/LOW/NONE), or '-'."""
    availability = entry.get("availability") or {}
    if isinstance(availability, dict):
        cloud_stock = availability.get(cloud.lower(), availability.get(cloud))
        if isinstance(cloud_stock, dict):
            return str(cloud_stock.get("stockStatus") or "-")
        if cloud_stock:
            return str(cloud_stock)
    return str(entry.get("stockStatus") or "-")


def monthly_costs(hourly: float, volume_gb: int, disk_gb: int, prices: tuple[float, float, float]) -> dict:
    """Per day and per month at 24 h/day, and per month at 8 h/day (stopped the rest), storage included."""
    volume_running, volume_stopped, disk_running = prices
    storage_24h = (volume_gb * volume_running + disk_gb * disk_running) / HOURS_PER_MONTH  # $/h while running
    share = 8 / 24
    month_8h = (hourly * HOURS_PER_MONTH * share + disk_gb * disk_running * share
                + volume_gb * (volume_running * share + volume_stopped * (1 - share)))
    return {
        "hour": hourly + storage_24h,
        "day": (hourly + storage_24h) * 24,
        "month": (hourly + storage_24h) * HOURS_PER_MONTH,
        "month_8h": month_8h,
        "stopped_month": volume_gb * volume_stopped,
    }
