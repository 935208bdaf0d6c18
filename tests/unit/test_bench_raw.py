"""scripts/bench.py --raw: plain `model.generate` on the checkpoint, text-only ones included."""

import bench
import pytest


@pytest.mark.parametrize("model_dir", ["tiny_vl_dir", "tiny_text_dir"])
def test_raw_generate_runs_on_vl_and_text_only_checkpoints(model_dir, request):
    [entry] = bench.raw_generate(request.getfixturevalue(model_dir), [2], max_tokens=3)
    assert entry["batch"] == 2 and entry["tokens_per_second"] > 0
