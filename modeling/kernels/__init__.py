"""Fused codebook lookup: argmax / log-sum-exp, IBQ straight-through and entropy loss, without N x K memory.

All operations take z [N, D] and codebook C [K, D] (fp32 or bf16; fp32 accumulation) and never materialise
the N x K logits. They dispatch to Triton kernels (`triton_kernels.py`) for CUDA tensors and to the chunked
torch implementation (`reference.py`) otherwise. The backend can be forced per call (`backend="torch"` or
`"triton"`) or process-wide with the environment variable ETT_KERNEL_BACKEND=auto|torch|triton. Triton on
CPU tensors runs only under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests the kernels.
"""

import math
import os

import torch

from modeling.kernels import reference

BACKEND_ENV_VAR = "ETT_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _triton_ops():
    from modeling.kernels import triton_kernels

    return triton_kernels


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(z: torch.Tensor, backend: str | None = None):
    """The module implementing the ops for z: `triton_kernels` or `reference`."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise ValueError(
            f"kernel backend must be one of {BACKENDS} (argument or ${BACKEND_ENV_VAR}), got {choice!r}"
        )
    if choice == "torch":
        return reference
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    triton_usable = (z.is_cuda or interpreted) and _triton_importable()
    if choice == "triton":
        if not triton_usable:
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got device {z.device}) or TRITON_INTERPRET=1, and an "
                "importable triton"
            )
        return _triton_ops()
    return _triton_ops() if z.is_cuda and triton_usable else reference


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(
            f"z must be [N, D] and codebook [K, D] (flatten leading dims first), got z {tuple(z.shape)} and "
            f"codebook {tuple(codebook.shape)}"
        )
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z dim {z.shape[1]} does not match codebook dim {codebook.shape[1]} (z [N, D], codebook [K, D])"
        )
    if z.shape[0] == 0 or codebook.shape[0] == 0:
        raise ValueError(
            f"z and codebook must be non-empty, got z {tuple(z.shape)}, codebook {tuple(codebook.shape)}"
        )
    for name, tensor in (("z", z), ("codebook", codebook)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be float32 or bfloat16, got {tensor.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}")
    if bias is not None and (bias.shape != (codebook.shape[0],) or bias.device != z.device):
        raise ValueError(
            f"bias must be [K] = [{codebook.shape[0]}] on {z.device}, got {tuple(bias.shape)} on {bias.device}"
        )


@torch.no_grad()
def codebook_argmax(
    z: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [N] int64 = argmax_k (z . c_k + b_k) and lse [N] fp32 = log sum_k exp(z . c_k + b_k). No grad.

    VQ (nearest code in L2) passes bias = -||c_k||^2 / 2, since argmin ||z - c||^2 = argmax z.c - ||c||^2 / 2.
    """
    _check_inputs(z, codebook, bias)
    stats = resolve_backend(z, backend).row_softmax_stats(z, codebook, bias)
    return stats.indices, stats.lse


class IBQStraightThrough(torch.autograd.Function):
    """z_q = (H - sg(S) + S) C with S = softmax(z C^T), H = one_hot(argmax S): value C[argmax], soft gradient."""

    @staticmethod
    def forward(ctx, z, codebook, backend):
        ops = resolve_backend(z, backend)
        needs_grad = any(ctx.needs_input_grad[:2])
        stats = ops.row_softmax_stats(z.detach(), codebook.detach(), soft_output=needs_grad)
        ctx.ops = ops
        ctx.save_for_backward(z, codebook, stats.indices, stats.lse, stats.soft_output)
        ctx.mark_non_differentiable(stats.indices)
        return codebook.detach()[stats.indices].to(z.dtype), stats.indices

    @staticmethod
    def backward(ctx, grad_zq, _grad_indices):
        z, codebook, indices, lse, soft_output = ctx.saved_tensors
        grad = grad_zq.float()
        delta = (grad * soft_output).sum(dim=1)
        grad_z, grad_codebook = ctx.ops.ibq_backward(z, codebook, grad, lse, delta)
        grad_codebook.index_add_(0, indices, grad)
        return grad_z.to(z.dtype), grad_codebook.to(codebook.dtype), None


def ibq_straight_through(
    z: torch.Tensor, codebook: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IBQ index propagation (docs/method.md): z_q [N, D] in z's dtype (= codebook[indices]) and indices [N].

    Backward: Ind = H - sg(S) + S gives dC = H^T g + dl^T z and dz = dl C, dl = S * (g C^T - rowsum(g * S C)).
    """
    _check_inputs(z, codebook)
    return IBQStraightThrough.apply(z, codebook, backend)


class CodebookEntropyLoss(torch.autograd.Function):
    """mean_n H(p_n) - H(mean_n p_n) with p = softmax((z C^T + b) / T): sharp per-token, spread over the batch."""

    @staticmethod
    def forward(ctx, z, codebook, bias, temperature, backend):
        ops = resolve_backend(z, backend)
        scale = 1.0 / temperature
        z, codebook = z.detach(), codebook.detach()
        bias = bias.detach() if bias is not None else None
        stats = ops.row_softmax_stats(z, codebook, bias, scale, entropy=True)
        avg_probs = ops.column_prob_sum(z, codebook, stats.lse, scale, bias=bias) / z.shape[0]
        batch_entropy = -torch.special.xlogy(avg_probs, avg_probs).sum()
        ctx.ops, ctx.scale = ops, scale
        ctx.save_for_backward(z, codebook, bias, stats.lse, stats.entropy, avg_probs)
        return stats.entropy.mean() - batch_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        z, codebook, bias, lse, row_entropy, avg_probs = ctx.saved_tensors
        log_avg_probs = torch.log(avg_probs.clamp_min(torch.finfo(torch.float32).tiny))
        grad_z, grad_codebook, grad_bias = ctx.ops.entropy_backward(
            z, codebook, lse, row_entropy, log_avg_probs, ctx.scale, bias=bias
        )
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(bias.dtype)
        return (
            (grad_z * grad_loss).to(z.dtype),
            (grad_codebook * grad_loss).to(codebook.dtype),
            grad_bias,
            None,
            None,
        )


def codebook_entropy_loss(
    z: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 0.01,
    *,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scalar fp32 entropy loss (L_entropy, docs/method.md), differentiable in z, codebook and bias.

    L = mean_n H(p_n) - H(q), p_n = softmax((z_n C^T + b) / T), q = mean_n p_n, H(x) = -sum_k x_k log x_k.
    IBQ passes no bias; VQ passes b = -||c_k||^2 / 2, so that the logits are -||z - c_k||^2 / 2 up to a per-row
    constant, at the code dim D itself (no appended column).
    """
    _check_inputs(z, codebook, bias)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"entropy temperature must be a positive finite number, got {temperature}")
    return CodebookEntropyLoss.apply(z, codebook, bias, float(temperature), backend)


__all__ = ["codebook_argmax", "ibq_straight_through", "codebook_entropy_loss", "resolve_backend"]
