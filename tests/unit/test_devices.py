"""Precision and placement decisions for every kind of machine."""

import pytest
import torch

from backend.engines.transformers_engine.devices import (
    Hardware,
    max_memory_map,
    memory_report,
    resolve_dtype,
    uses_cuda,
)

CPU = Hardware(cuda_devices=0, bf16_supported=False)
A100 = Hardware(cuda_devices=1, bf16_supported=True)
V100 = Hardware(cuda_devices=2, bf16_supported=False)


@pytest.mark.parametrize(
    ("requested", "hardware", "checkpoint", "expected"),
    [
        ("auto", CPU, torch.bfloat16, torch.float32),
        ("auto", A100, torch.bfloat16, torch.bfloat16),
        ("auto", A100, torch.float16, torch.float16),
        ("auto", A100, torch.float32, torch.bfloat16),
        ("auto", A100, None, torch.bfloat16),
        ("auto", V100, torch.bfloat16, torch.float16),
        ("float16", A100, torch.bfloat16, torch.float16),
        ("float32", A100, torch.bfloat16, torch.float32),
        ("bfloat16", CPU, None, torch.bfloat16),
    ],
)
def test_resolve_dtype(requested, hardware, checkpoint, expected):
    assert resolve_dtype(requested, hardware, checkpoint) == expected


def test_placement_and_memory_cap():
    assert not uses_cuda("auto", CPU)
    assert uses_cuda("auto", A100)
    assert not uses_cuda("cpu", A100)
    assert max_memory_map("75GiB", V100) == {0: "75GiB", 1: "75GiB"}


def test_memory_report_has_the_process_rss():
    report = memory_report()
    assert report["process_rss_bytes"] > 10 * 2**20
    assert isinstance(report["gpus"], list)
