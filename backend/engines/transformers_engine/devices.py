"""What the hardware offers: the precision to load in, where the model goes, how much memory it uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.process_memory import process_rss_bytes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Hardware:
    """The facts about this machine that decide precision and placement."""

    cuda_devices: int
    bf16_supported: bool

    @classmethod
    def detect(cls) -> Hardware:
        """Look at the CUDA devices this process can see."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        bf16 = bool(count) and torch.cuda.is_bf16_supported()
        return cls(cuda_devices=count, bf16_supported=bf16)


def resolve_dtype(requested: str, hardware: Hardware, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """The precision to load the weights in.

    `auto` picks the checkpoint's own half-precision type (Qwen2.5-VL ships bfloat16) on GPUs that support
    bfloat16, float16 on older GPUs, and float32 on CPU, where half precision is slow and inexact.
    Qwen2/Qwen2.5-VL were trained in bfloat16 and can overflow in float16 (answers of "!!!!"), which is why
    bfloat16 wins whenever the GPU has it: same memory, same speed on an A100.
    """
    if requested != "auto":
        return DTYPES[requested]
    if hardware.cuda_devices == 0:
        return torch.float32
    if not hardware.bf16_supported:
        return torch.float16
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


def uses_cuda(device_map: str, hardware: Hardware) -> bool:
    """Whether the weights go to GPUs: there are some, and DEVICE_MAP does not ask for the CPU."""
    return hardware.cuda_devices > 0 and device_map.strip().lower() != "cpu"


def max_memory_map(max_gpu_memory: str, hardware: Hardware) -> dict[int | str, str]:
    """accelerate's `max_memory`: the same cap on every GPU (the rest of each card is for activations)."""
    return {index: max_gpu_memory for index in range(hardware.cuda_devices)}


def memory_report() -> dict:
    """Memory in use: per GPU (allocated, reserved, total) on CUDA, and the process RSS always."""
    report: dict = {"process_rss_bytes": process_rss_bytes(), "gpus": []}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            report["gpus"].append(
                {
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "allocated_bytes": torch.cuda.memory_allocated(index),
                    "reserved_bytes": torch.cuda.memory_reserved(index),
                    "used_bytes": total - free,  # the whole device's, as NVML reports it (other processes too)
                    "free_bytes": free,
                    "total_bytes": total,
                }
            )
    return report


def free_accelerator_cache() -> None:
    """Give cached blocks back after an out-of-memory error, so the next request can allocate."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
