"""scripts/bench.py --vs-vllm: the plan, the ratios and the target, the table, the arguments and the output,
with stand-ins for the servers (the real run starts vLLM three times, which takes minutes)."""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import bench
import bench_servers
import bench_vs_vllm as vs
import httpx
import pytest

PEER, OURS, TRANSFORMERS = vs.PEER, vs.OURS_VLLM, vs.OURS_TRANSFORMERS


def result(server, clients=1, tokens=100.0, latency=1.0, ttft=0.1, errors=0):
    return bench.LevelResult(
        server=server,
        concurrency=clients,
        seconds=5.0,
        requests=10,
        errors=errors,
        output_tokens=int(tokens * 5),
        requests_per_second=2.0,
        tokens_per_second=tokens,
        latency_p50=latency,
        latency_p95=latency,
        ttft_p50=ttft,
        ttft_p95=ttft,
        rss_after_mib=1234.0,
    )


# --- the plan ---


def test_loads_are_parsed_in_order_without_duplicates():
    assert vs.parse_loads("text,mixed") == ["text", "mixed"]
    assert vs.parse_loads(" mixed , text,mixed") == ["mixed", "text"]
    for bad in ["", "text,images", ","]:
        with pytest.raises(ValueError, match="--loads"):
            vs.parse_loads(bad)


def test_the_order_rotates_so_each_server_takes_each_place_equally_often():
    assert vs.level_order(vs.SERVERS, 0) == [PEER, OURS, TRANSFORMERS]
    assert vs.level_order(vs.SERVERS, 1) == [OURS, TRANSFORMERS, PEER]
    assert vs.level_order(vs.SERVERS, 2) == [TRANSFORMERS, PEER, OURS]
    assert vs.level_order(vs.SERVERS, 3) == [PEER, OURS, TRANSFORMERS]
    assert vs.level_order(["ours", "peer"], 1) == ["peer", "ours"]  # two servers: reversed every other level
    assert vs.level_order([], 5) == []


def test_the_plan_runs_every_server_once_per_load_and_level_counting_rounds_across_loads():
    runs = vs.plan(["text", "mixed"], [1, 8, 32])
    assert runs[:6] == [
        ("text", 1, PEER),
        ("text", 1, OURS),
        ("text", 1, TRANSFORMERS),
        ("text", 8, OURS),
        ("text", 8, TRANSFORMERS),
        ("text", 8, PEER),
    ]
    assert runs[9:12] == [("mixed", 1, PEER), ("mixed", 1, OURS), ("mixed", 1, TRANSFORMERS)]  # round 3
    assert Counter(runs) == Counter(
        (load, level, s) for load in ["text", "mixed"] for level in [1, 8, 32] for s in vs.SERVERS
    )
    firsts = Counter(runs[i][2] for i in range(0, len(runs), 3))
    assert firsts == {PEER: 2, OURS: 2, TRANSFORMERS: 2}


async def test_run_plan_measures_in_plan_order_and_groups_by_load():
    calls = []

    async def measure(load, server, level):
        calls.append((load, level, server))
        return result(server, level)

    results = await vs.run_plan(["mixed"], [2, 4], measure)
    assert calls == vs.plan(["mixed"], [2, 4])
    assert [(r.server, r.concurrency) for r in results["mixed"]] == [(s, lv) for _, lv, s in calls]


# --- ratios and the target ---


def test_ratios_and_the_target_at_its_bounds():
    comparison = vs.compare_level(
        "text",
        8,
        peer=result(PEER, 8, tokens=200.0, latency=2.0, ttft=0.2),
        ours=result(OURS, 8, tokens=190.0, latency=2.1, ttft=0.21),  # exactly 0.95x and 1.05x: holds
        transformers=result(TRANSFORMERS, 8, tokens=50.0),
    )
    assert comparison.tokens_ratio == pytest.approx(0.95)
    assert comparison.latency_p95_ratio == pytest.approx(1.05)
    assert comparison.ttft_p95_ratio == pytest.approx(1.05)
    assert comparison.transformers_tokens_ratio == pytest.approx(0.25)
    assert comparison.target_holds and comparison.misses == []


def test_each_way_of_missing_the_target_is_named():
    peer = result(PEER, tokens=200.0, latency=2.0, ttft=0.2)
    slow = vs.compare_level("text", 1, peer, result(OURS, tokens=189.0, latency=2.2, ttft=0.3), None)
    assert not slow.target_holds
    assert slow.misses == ["tok/s", "p95 latency", "p95 TTFT"]
    assert slow.transformers_tokens_ratio is None

    faster = vs.compare_level("text", 1, peer, result(OURS, tokens=300.0, latency=1.0, ttft=0.1), None)
    assert faster.target_holds and faster.tokens_ratio == pytest.approx(1.5)

    no_ttft = vs.compare_level("text", 1, peer, result(OURS, tokens=200.0, latency=2.0, ttft=None), None)
    assert no_ttft.misses == ["no p95 TTFT"] and no_ttft.ttft_p95_ratio is None

    errors = vs.compare_level("text", 1, result(PEER, errors=1), result(OURS, errors=3), None)
    assert errors.misses == ["3 errors", "peer had 1 errors"]


def test_ratio_is_none_without_both_numbers():
    assert vs.ratio(2.0, 4.0) == 0.5
    assert vs.ratio(None, 4.0) is None
    assert vs.ratio(2.0, None) is None
    assert vs.ratio(2.0, 0.0) is None


def test_compare_pairs_results_by_level_and_skips_levels_without_both():
    results = [
        result(PEER, 1, tokens=100.0),
        result(OURS, 1, tokens=100.0),
        result(TRANSFORMERS, 1, tokens=20.0),
        result(OURS, 8, tokens=300.0),
        result(PEER, 8, tokens=250.0),
        result(TRANSFORMERS, 32, tokens=10.0),  # a level without the peer: nothing to compare
    ]
    comparisons = vs.compare("mixed", results)
    assert [(c.load, c.concurrency) for c in comparisons] == [("mixed", 1), ("mixed", 8)]
    assert comparisons[0].transformers_tokens_ratio == pytest.approx(0.2)
    assert comparisons[1].transformers_tokens_ratio is None
    assert comparisons[1].tokens_ratio == pytest.approx(1.2)


# --- the table ---


def test_the_table_lists_each_server_per_level_then_ratios_and_the_verdict(capsys):
    results = {
        "text": [
            result(OURS, 1, tokens=98.0, latency=1.01, ttft=0.1),
            result(TRANSFORMERS, 1, tokens=30.0),
            result(PEER, 1, tokens=100.0, latency=1.0, ttft=0.1),
        ],
        "mixed": [
            result(PEER, 1, tokens=100.0, latency=1.0, ttft=0.1),
            result(OURS, 1, tokens=80.0, latency=1.3, ttft=0.1),
            result(TRANSFORMERS, 1, tokens=25.0),
        ],
    }
    comparisons = {load: vs.compare(load, rows) for load, rows in results.items()}
    vs.print_vs_vllm(results, comparisons)
    out = capsys.readouterr().out
    assert "=== load: text (text only) ===" in out
    assert "=== load: mixed (mixed: every 4th request has a 448x336 photo) ===" in out
    text_part = out.split("=== load: mixed")[0]
    rows = [line[9:31].strip() for line in text_part.splitlines() if line.startswith("      1  ")]
    assert rows[:3] == [PEER, OURS, TRANSFORMERS]  # the peer first, whatever the order they ran in
    assert "0.98x" in text_part and "holds" in text_part and "0.30x" in text_part
    assert "MISSED: tok/s, p95 latency" in out
    assert "1 of 2 (load, clients) points within target (target missed somewhere)" in out


def test_the_summary_says_when_the_target_holds_everywhere():
    holds = vs.compare_level("text", 1, result(PEER), result(OURS), None)
    assert "1 of 1" in vs.format_summary([holds]) and "target holds everywhere" in vs.format_summary([holds])
    assert "target missed somewhere" in vs.format_summary([])


# --- arguments ---


def test_arguments_default_to_the_bench_checkpoint_and_both_loads():
    args = bench.parse_args(["--vs-vllm"])
    assert args.vs_vllm and args.load_names == ["text", "mixed"] and args.levels == [1, 8, 32]
    assert args.size == "bench" and args.checkpoint is None
    assert not args.enforce_eager and args.kv_cache_gib == 2.0 and args.max_model_len == 2048
    assert args.vllm_python.endswith(os.path.join(".venv-vllm", "bin", "python"))


def test_arguments_of_a_quick_run():
    args = bench.parse_args(
        ["--vs-vllm", "--size", "small", "--concurrency", "1,2", "--duration", "5", "--max-tokens", "16"]
        + ["--ignore-eos", "--loads", "mixed", "--enforce-eager"]
    )
    assert args.levels == [1, 2] and args.load_names == ["mixed"] and args.enforce_eager and args.ignore_eos
    assert args.size == "small" and args.duration == 5.0 and args.max_tokens == 16


@pytest.mark.parametrize(
    "argv",
    [
        ["--vs-vllm", "--url", "http://127.0.0.1:9"],
        ["--vs-vllm", "--vs-transformers-serve"],
        ["--vs-vllm", "--loads", "text,video"],
        ["--concurrency", "1,x"],
        ["--concurrency", "0"],
    ],
)
def test_bad_argument_combinations_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_the_other_modes_still_parse():
    assert bench.parse_args(["--url", "http://127.0.0.1:9", "--model", "m"]).url == "http://127.0.0.1:9"
    args = bench.parse_args(["--vs-transformers-serve", "--raw", "--image-every", "0"])
    assert args.vs_transformers_serve and args.raw and args.image_every == 0 and not args.vs_vllm


# --- what the three servers are started with ---


def setup(tmp_path, **options):
    return bench_servers.VllmSetup(
        tmp_path / "ckpt", tmp_path, vllm_python="/v/python", transformers_python="/t/python", max_num_seqs=8, **options
    )


def test_vllm_serve_and_ours_get_the_same_engine_options(tmp_path):
    command = setup(tmp_path).peer_command(1234)
    assert command[:3] == ["/v/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[-1] == "--enable-prefix-caching"  # on by default in ours (ENABLE_PREFIX_CACHING)
    options = dict(zip(command[3:-1:2], command[4:-1:2], strict=True))
    assert options["--model"] == str(tmp_path / "ckpt") and options["--served-model-name"] == "bench"
    assert options["--port"] == "1234" and options["--host"] == "127.0.0.1"
    assert options["--max-model-len"] == "2048" and options["--max-num-seqs"] == "8"
    assert json.loads(options["--limit-mm-per-prompt"]) == {"image": 8, "video": 0}
    assert json.loads(options["--mm-processor-kwargs"]) == {"min_pixels": 56 * 56, "max_pixels": 360 * 420}
    assert "--enforce-eager" not in command  # compiled, as `vllm serve` is by default

    ours = bench_servers.ours_env(tmp_path / "ckpt", 1235, 8, **setup(tmp_path).ours_settings("vllm"))
    assert ours["ENGINE"] == "vllm" and ours["MAX_BATCH_SIZE"] == "8" and ours["MAX_MODEL_LEN"] == "2048"
    assert ours["CPU_KV_CACHE_GIB"] == "2" and ours["VLLM_CPU_KVCACHE_SPACE"] == "2" and ours["MAX_QUEUE"] == "256"
    assert ours["SERVED_MODEL_NAME"] == "bench" and ours["HF_HUB_OFFLINE"] == "1" and "ENFORCE_EAGER" not in ours


def test_enforce_eager_goes_to_both_vllm_servers_and_not_to_transformers(tmp_path):
    eager = setup(tmp_path, enforce_eager=True, kv_cache_gib=1.5)
    assert "--enforce-eager" in eager.peer_command(1)
    assert eager.ours_settings("vllm")["ENFORCE_EAGER"] == "true"
    assert eager.ours_settings("vllm")["CPU_KV_CACHE_GIB"] == "1.5" == eager.kv_env()["VLLM_CPU_KVCACHE_SPACE"]
    transformers = eager.ours_settings("transformers")
    assert transformers == {"ENGINE": "transformers", "MAX_MODEL_LEN": "2048", "MAX_QUEUE": "256"}


def test_process_tree_rss():
    assert bench_servers.process_tree_rss_mib(os.getpid()) > 1
    assert bench_servers.process_tree_rss_mib(2**22 + 1) is None  # above Linux's largest pid


# --- the whole run, with stand-ins for the servers and the load ---


class FakeServer:
    def __init__(self, name, events):
        self.name, self.url, self.pid = name, f"http://127.0.0.1/{name}", 1
        self.command, self.log_path = ["serve", name], Path(f"/logs/{name}.log")
        self.events = events

    def stop(self):
        self.events.append(("stop", self.name))


class FakeSetup:
    def __init__(self, *args, fail_on=None, **options):
        self.events, self.fail_on, self.options = [], fail_on, options

    def start_peer(self, name):
        return self._start(name, "peer")

    def start_ours(self, name, engine):
        return self._start(name, engine)

    def _start(self, name, kind):
        if kind == self.fail_on:
            raise RuntimeError(f"{name} did not start")
        self.events.append(("start", name))
        return FakeServer(name, self.events)


def test_main_runs_every_load_against_the_three_servers_and_writes_the_json(tmp_path, monkeypatch, capsys):
    setups = []

    def make_setup(*args, **options):
        setups.append(FakeSetup(*args, **options))
        return setups[-1]

    runs = []
    speeds = {PEER: 100.0, OURS: 97.0, TRANSFORMERS: 30.0}

    async def fake_run_level(name, url, load, concurrency, duration, pid=None):
        runs.append((load.image_every, concurrency, name))
        return result(name, concurrency, tokens=speeds[name] * concurrency)

    monkeypatch.setattr(bench, "VllmSetup", make_setup)
    monkeypatch.setattr(bench, "run_level", fake_run_level)
    monkeypatch.setattr(bench, "photo_data_uri", lambda: "data:image/jpeg;base64,")
    out = tmp_path / "out.json"
    argv = ["--vs-vllm", "--checkpoint", str(tmp_path), "--concurrency", "1,2", "--duration", "5"]
    argv += ["--loads", "text,mixed", "--enforce-eager", "--vllm-python", sys.executable, "--json", str(out)]
    argv += ["--log-dir", str(tmp_path / "logs"), "--vllm-dtype", "float32"]
    assert bench.main(argv) == 0

    [fake] = setups
    assert fake.options["enforce_eager"] and fake.options["max_num_seqs"] == 2
    assert fake.options["dtype"] == "float32"
    assert fake.events[:3] == [("start", PEER), ("start", OURS), ("start", TRANSFORMERS)]
    assert sorted(fake.events[3:]) == sorted(("stop", name) for name in vs.SERVERS)
    assert runs == [(0 if load == "text" else 4, level, s) for load, level, s in vs.plan(["text", "mixed"], [1, 2])]

    printed = capsys.readouterr().out
    assert "=== load: text" in printed and "=== load: mixed" in printed
    assert "4 of 4 (load, clients) points within target" in printed

    written = json.loads(out.read_text())
    assert written["mode"] == "vs-vllm" and set(written["loads"]) == {"text", "mixed"}
    assert written["loads"]["mixed"]["image_every"] == 4
    assert len(written["loads"]["text"]["levels"]) == 6
    [first, second] = written["loads"]["text"]["comparison"]
    assert first["tokens_ratio"] == pytest.approx(0.97) and first["target_holds"]
    assert second["transformers_tokens_ratio"] == pytest.approx(0.3)
    assert written["servers"][PEER]["command"] == ["serve", PEER]
    assert written["target"] == {"min_tokens_ratio": 0.95, "max_latency_ratio": 1.05}


async def test_servers_already_started_are_stopped_when_one_fails_to_start():
    fake = FakeSetup(fail_on="transformers")

    async def measure(server, load, level):
        raise AssertionError("nothing is measured")

    with pytest.raises(RuntimeError, match="did not start"):
        await vs.run_vs_vllm(fake, ["text"], [1], measure)
    assert fake.events == [("start", PEER), ("start", OURS), ("stop", PEER), ("stop", OURS)]


# --- reading a vLLM-style stream ---


async def test_a_stream_with_null_usage_chunks_counts_the_final_usage_and_the_first_content():
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": None},
        {"choices": [{"delta": {"content": "舌"}}], "usage": None},
        {"choices": [{"delta": {"content": "诊"}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}},
    ]
    body = "".join(f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n" for c in chunks)
    body += "data: [DONE]\n\n"

    def handler(request):
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://peer") as client:
        sample, error = await bench.one_request(client, {"stream": True}, False)
    assert error is None and sample.ok and sample.tokens == 16 and sample.ttft is not None


def test_the_vllm_dtype_goes_to_both_vllm_servers_and_not_to_transformers(tmp_path):
    float32 = setup(tmp_path, dtype="float32")
    command = float32.peer_command(1)
    assert command[command.index("--dtype") + 1] == "float32"
    assert float32.ours_settings("vllm")["DTYPE"] == "float32"
    assert "DTYPE" not in float32.ours_settings("transformers")
    args = bench.parse_args(["--vs-vllm", "--vllm-dtype", "float32"])
    assert args.vllm_dtype == "float32"
