"""FLOP accounting for throughput and MFU, in one place.

Training FLOPs per optimizer step = 3 x (forward FLOPs of one micro-batch) x micro-batches per step x world size.
The forward FLOPs are counted once, on the first micro-batch, by `torch.utils.flop_counter.FlopCounterMode` over the
whole model: LLM matmuls and attention, projector, and the tokenizer's encoder, decoder and codebook logits, so the
tokenizer is included exactly as it runs (x3 = forward + backward, the usual 1:2 rule; activation recomputation is
not counted, as in Megatron's MFU). MFU = achieved FLOP/s / peak FLOP/s of the device (bf16 dense tensor-core peak
for GPUs in PEAK_TFLOPS; on CPU set ETT_PEAK_TFLOPS to get an MFU, otherwise only FLOP/s is reported).
"""

from __future__ import annotations

import os

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops_per_second() -> float | None:
    """Dense bf16 peak of this device in FLOP/s, or None when unknown (CPU without ETT_PEAK_TFLOPS)."""
    if "ETT_PEAK_TFLOPS" in os.environ:
        return float(os.environ["ETT_PEAK_TFLOPS"]) * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def count_forward_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run fn(*args, **kwargs) under the FLOP counter; returns (forward FLOPs, fn's result)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    return int(counter.get_total_flops()), result


def mfu(flops_per_step: float, seconds_per_step: float) -> float | None:
    peak = peak_flops_per_second()
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak
