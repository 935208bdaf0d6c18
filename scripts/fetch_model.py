"""Download MODEL_ID into $HF_HOME/hub with resume and retries, then verify the files; used by deploy_runpod.sh.

    python scripts/fetch_model.py [--retries 6]

Reads the same settings as the server (environment and .env). A local folder is only verified. A hub id already
in the cache is verified without touching the network. Exit status 0 = the checkpoint is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def missing_files(folder: Path) -> list[str]:
    """What a loadable checkpoint lacks: config, tokenizer, and every weight shard its index names."""
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        missing.append("tokenizer.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors (or model.safetensors.index.json)")
    return missing


def fetch(retries: int) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from backend.engines.transformers_engine.loader import hub_download_options
    from backend.settings import Settings

    settings = Settings()
    local = Path(settings.model_id).expanduser()
    if local.is_dir():
        folder = local
        print(f"MODEL_ID is a local folder: {folder}")
    else:
        options = hub_download_options(settings)
        try:
            folder = Path(snapshot_download(**options, local_files_only=True))
            if missing_files(folder):
                raise LocalEntryNotFoundError("incomplete")
            print(f"{settings.model_id} is already in the cache: {folder}")
        except LocalEntryNotFoundError:
            folder = None
            for attempt in range(1, retries + 1):
                try:
                    print(
                        f"downloading {settings.model_id} into {settings.hub_cache_dir} (attempt {attempt}/{retries})"
                    )
                    folder = Path(snapshot_download(**options))  # resumes partial files
                    break
                except Exception as exc:  # network, rate limits, 5xx: back off and resume
                    if attempt == retries:
                        print(f"download failed after {retries} attempts: {exc}", file=sys.stderr)
                        print("Check the network, HF_TOKEN for gated models, and the disk space.", file=sys.stderr)
                        return 1
                    delay = min(2**attempt, 120)
                    print(f"download failed ({exc}); retrying in {delay} s", file=sys.stderr)
                    time.sleep(delay)
    missing = missing_files(folder)
    if missing:
        print(f"the checkpoint in {folder} is incomplete; missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"verified: {folder} ({size / 2**30:.2f} GiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retries", type=int, default=6, help="download attempts, with exponential backoff")
    return fetch(parser.parse_args(argv).retries)


if __name__ == "__main__":
    sys.exit(main())
