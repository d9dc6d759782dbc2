"""Fused codebook lookup: argmax / log-sum-exp, IBQ straight-through and entropy loss, without N x K memory; and
the fused linear cross-entropy of a large-vocabulary head (LM head, t2i visual head), without N x V memory.

All operations take z [N, D] and codebook C [K, D] (fp32 or bf16; fp32 accumulation) and never materialise
the N x K logits. They dispatch to Triton kernels (`triton_kernels.py`) for CUDA tensors and to the chunked
torch implementation (`reference.py`) otherwise. The backend can be forced per call (`backend="torch"` or
`"triton"`) or process-wide with the environment variable ETT_KERNEL_BACKEND=auto|torch|triton. Triton on
CPU tensors runs only under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests the kernels.
"""

import importlib.util
import math
import os
from typing import NamedTuple

import torch

# `from .reference import` is the form transformers' dynamic-module loader follows to copy reference.py along with
# this file into a Hugging Face export (training/hf_model); `from . import reference` binds the module itself.
from . import reference
from .reference import RowStats

BACKEND_ENV_VAR = "ETT_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _triton_ops():
    from . import triton_kernels

    return triton_kernels


def _triton_importable() -> bool:
    """triton is installed and triton_kernels.py sits next to this file (a Hugging Face export ships only the
    torch reference)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec(".triton_kernels", __package__) is not None


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


class CrossEntropyTotals(NamedTuple):
    """loss_sum: fp32 scalar, sum of the CE over the counted rows (differentiable); correct: int64 scalar, counted
    rows whose argmax is the label; count: int64 scalar, rows whose label is not ignore_index."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


class LinearCrossEntropy(torch.autograd.Function):
    """sum_n (lse_n - l_{n, y_n}) with l = h W^T, every logit tile recomputed in backward (none is stored)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, backend, budget):
        ops = reference if hidden.shape[0] == 0 else resolve_backend(hidden, backend)
        options = {"budget": budget} if ops is reference else {}
        stats = ops.linear_cross_entropy_stats(hidden.detach(), weight.detach(), labels, **options)
        ctx.ops, ctx.options = ops, options
        ctx.save_for_backward(hidden, weight, labels, stats.lse)
        ctx.mark_non_differentiable(stats.argmax)
        return (stats.lse - stats.target_logit).sum(), stats.argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_argmax):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden, grad_weight = ctx.ops.linear_cross_entropy_backward(
            hidden.detach(), weight.detach(), labels, lse, **ctx.options
        )
        return (
            grad_hidden.mul_(grad_loss).to(hidden.dtype),
            grad_weight.mul_(grad_loss).to(weight.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str | None = None,
    budget: int | None = None,
) -> CrossEntropyTotals:
    """Softmax cross-entropy of the logits h W^T against labels, without the N x V logits (fused linear CE).

    hidden [N, C], weight [V, C] (fp32 or bf16, fp32 accumulation), labels [N] int in [0, V) or ignore_index.
    loss_sum = sum_{n: y_n != ignore} (log sum_v exp(h_n . w_v) - h_n . w_{y_n}), so the mean CE of
    F.cross_entropy(h W^T, y) is loss_sum / count; dh = dl W and dW = dl^T h with dl = softmax(l) - onehot(y).
    The argmax for `correct` comes from the same pass. Ignored rows are dropped before the kernels. `budget`: the
    torch path's bytes for one tile's temporaries (reference.MEMORY_BUDGET_BYTES by default).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden [N, C] and weight [V, C] with the same C, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer [N] = [{hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be float32 or bfloat16, got {tensor.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and labels ({labels.device}) must share a device"
        )
    counted = labels != ignore_index
    rows = counted.nonzero().squeeze(1)
    targets = labels[rows].long()
    vocab = weight.shape[0]
    out_of_range = (targets < 0) | (targets >= vocab)
    if bool(out_of_range.any()):
        raise ValueError(
            f"label {targets[out_of_range][0].item()} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
        )
    loss_sum, argmax = LinearCrossEntropy.apply(hidden[rows], weight, targets, backend, budget)
    return CrossEntropyTotals(loss_sum, (argmax == targets).sum(), counted.sum())


__all__ = [
    "RowStats",
    "codebook_argmax",
    "ibq_straight_through",
    "codebook_entropy_loss",
    "linear_cross_entropy",
    "CrossEntropyTotals",
    "resolve_backend",
]
