"""megatron-core tensor-parallel setup, and the one place that makes megatron-core 0.16.1 run on CPU.

megatron-core calls CUDA directly in a few places our layers reach (`torch.cuda.current_device()` for buffers,
`torch.cuda.{get,set}_rng_state` in its RNG tracker, `model_parallel_cuda_manual_seed`). On a machine without
CUDA, `apply_cpu_shim()` redirects exactly those calls to their CPU equivalents (research/feasibility_cpu.md §4).
It is applied only by `initialize_tensor_parallel` when tp > 1 and CUDA is absent; tp = 1 never imports
megatron-core. The shim changes process-wide `torch.cuda` functions, which is harmless on a CPU-only process
(they would raise otherwise) and never happens on a GPU machine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_SHIM_APPLIED = False


def apply_cpu_shim() -> None:
    """Redirect megatron-core's hard-coded CUDA device / RNG calls to the CPU. Idempotent; CPU-only processes."""
    global _SHIM_APPLIED
    if _SHIM_APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_shim is for CPU-only processes; CUDA is available here")
    import megatron.core.tensor_parallel.random as megatron_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.random.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )
    megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    _SHIM_APPLIED = True


def initialize_tensor_parallel(tensor_parallel_size: int, seed: int = 1234) -> None:
    """Create megatron-core's tensor-parallel groups (pipeline size 1) over the default torch.distributed
    group, after `dist.init_process_group` (gloo on CPU, nccl on GPU), and seed its RNG tracker."""
    if not dist.is_initialized():
        raise ValueError("initialize_tensor_parallel needs torch.distributed.init_process_group first")
    if dist.get_world_size() % tensor_parallel_size:
        raise ValueError(
            f"world size {dist.get_world_size()} is not divisible by tensor_parallel_size {tensor_parallel_size}"
        )
    if not torch.cuda.is_available():
        apply_cpu_shim()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size, pipeline_model_parallel_size=1
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_tensor_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
