"""Chunked torch implementation of the codebook kernels and of the linear cross-entropy: the CPU path and the
correctness oracle.

Every function here tiles the N x K logits l = (z C^T + b) * scale into (tile_n x tile_k) blocks whose size
comes from a memory budget, and merges the blocks with online (flash-attention style) reductions, so no
N x K tensor ever exists. Inputs may be fp32 or bf16; all arithmetic is fp32.

Notation: z [N, D], C = codebook [K, D], bias b [K], p = softmax(l) over k, lse_n = log sum_k exp(l_nk).
The linear cross-entropy tiles the N x V logits h W^T of a classifier head the same way (hidden h [N, C], weight
W [V, C]), with a budget that also covers the fp32 copy of a bf16 weight tile.
"""

import math
from dataclasses import dataclass

import torch

MEMORY_BUDGET_BYTES = 256 * 2**20
"""Default budget for the N x K-proportional temporaries of one tile (override per call with `budget`)."""

BYTES_PER_LOGIT = 16
"""fp32 temporaries alive per logit inside one tile (logits, probabilities, one product, one mask)."""

MIN_TILE_ROWS = 64


@dataclass
class RowStats:
    """Per-row results of one pass over the codebook.

    indices [N] int64: argmax_k l_nk.  lse [N] fp32: log-sum-exp of l_n.
    entropy [N] fp32 or None: H(p_n) = lse_n - sum_k p_nk l_nk.
    soft_output [N, D] fp32 or None: sum_k p_nk c_k (attention's output with Q = z, K = V = C).
    """

    indices: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None = None
    soft_output: torch.Tensor | None = None


def tile_sizes(n: int, k: int, budget: int | None = None) -> tuple[int, int]:
    """(tile_n, tile_k) with tile_n * tile_k * BYTES_PER_LOGIT <= budget; whole rows of K when they fit."""
    budget = MEMORY_BUDGET_BYTES if budget is None else budget
    if budget < BYTES_PER_LOGIT:
        raise ValueError(f"memory budget must be at least {BYTES_PER_LOGIT} bytes, got {budget}")
    max_logits = budget // BYTES_PER_LOGIT
    min_rows = min(n, MIN_TILE_ROWS)
    tile_k = k if k * min_rows <= max_logits else max(1, max_logits // min_rows)
    tile_n = max(1, min(n, max_logits // tile_k))
    return tile_n, tile_k


def _tile_logits(
    z_tile: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, k0: int, k1: int, scale: float
):
    """l[n, k] = (z_n . c_k + b_k) * scale for one tile, fp32."""
    logits = z_tile @ codebook[k0:k1].float().T
    if bias is not None:
        logits += bias[k0:k1].float()
    if scale != 1.0:
        logits *= scale
    return logits


def row_softmax_stats(
    z: torch.Tensor,
    codebook: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    entropy: bool = False,
    soft_output: bool = False,
    budget: int | None = None,
) -> RowStats:
    """Argmax, log-sum-exp and optionally the entropy and soft output of every row of l, by online merging.

    Over code tiles with running max m, running sum s = sum exp(l - m) and a = sum exp(l - m) (l - m):
    a new max m' rescales s and a by exp(m - m') and shifts a by (m - m') s, so H = log s - a / s exactly.
    """
    n, dim = z.shape
    k = codebook.shape[0]
    tile_n, tile_k = tile_sizes(n, k, budget)
    device = z.device
    indices = torch.empty(n, dtype=torch.long, device=device)
    lse = torch.empty(n, dtype=torch.float32, device=device)
    row_entropy = torch.empty(n, dtype=torch.float32, device=device) if entropy else None
    soft = torch.empty(n, dim, dtype=torch.float32, device=device) if soft_output else None
    for n0 in range(0, n, tile_n):
        n1 = min(n, n0 + tile_n)
        z_tile = z[n0:n1].float()
        run_max = torch.full((n1 - n0,), -math.inf, device=device)
        run_idx = torch.zeros(n1 - n0, dtype=torch.long, device=device)
        run_sum = torch.zeros(n1 - n0, device=device)
        run_plogp = torch.zeros(n1 - n0, device=device)
        run_out = torch.zeros(n1 - n0, dim, device=device) if soft_output else None
        for k0 in range(0, k, tile_k):
            k1 = min(k, k0 + tile_k)
            logits = _tile_logits(z_tile, codebook, bias, k0, k1, scale)
            tile_max, tile_idx = logits.max(dim=1)
            new_max = torch.maximum(run_max, tile_max)
            run_idx = torch.where(tile_max > run_max, tile_idx + k0, run_idx)
            rescale = torch.exp(run_max - new_max)
            logits -= new_max[:, None]
            probs = torch.exp(logits)
            if entropy:
                shift = torch.where(run_sum > 0, run_max - new_max, torch.zeros_like(run_max))
                run_plogp = rescale * (run_plogp + shift * run_sum) + (probs * logits).sum(dim=1)
            run_sum = rescale * run_sum + probs.sum(dim=1)
            if soft_output:
                run_out = rescale[:, None] * run_out + probs @ codebook[k0:k1].float()
            run_max = new_max
            del logits, probs  # free this tile before the next one is allocated
        indices[n0:n1] = run_idx
        lse[n0:n1] = run_max + torch.log(run_sum)
        if entropy:
            row_entropy[n0:n1] = torch.log(run_sum) - run_plogp / run_sum
        if soft_output:
            soft[n0:n1] = run_out / run_sum[:, None]
    return RowStats(indices=indices, lse=lse, entropy=row_entropy, soft_output=soft)


def column_prob_sum(
    z: torch.Tensor,
    codebook: torch.Tensor,
    lse: torch.Tensor,
    scale: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    budget: int | None = None,
) -> torch.Tensor:
    """sum_n p_nk [K] fp32, with p_nk = exp(l_nk - lse_n) and l = (z C^T + b) * scale."""
    n = z.shape[0]
    k = codebook.shape[0]
    tile_n, tile_k = tile_sizes(n, k, budget)
    total = torch.zeros(k, dtype=torch.float32, device=z.device)
    for n0 in range(0, n, tile_n):
        n1 = min(n, n0 + tile_n)
        z_tile = z[n0:n1].float()
        for k0 in range(0, k, tile_k):
            k1 = min(k, k0 + tile_k)
            logits = _tile_logits(z_tile, codebook, bias, k0, k1, scale)
            total[k0:k1] += torch.exp(logits - lse[n0:n1, None]).sum(dim=0)
            del logits
    return total


def ibq_backward(
    z: torch.Tensor,
    codebook: torch.Tensor,
    grad: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-path gradients of IBQ's straight-through output z_q = (H - sg(S) + S) C, S = softmax(z C^T).

    With upstream g [N, D] and delta_n = g_n . (S C)_n:
    dl = S * (g C^T - delta[:, None]),  dz = dl C,  dC = dl^T z   (attention backward, Q = z, K = V = C).
    The direct term H^T g (scatter-add into the chosen codes) is added by the caller. Returns fp32 (dz, dC).
    """
    n = z.shape[0]
    k = codebook.shape[0]
    tile_n, tile_k = tile_sizes(n, k, budget)
    grad_z = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
    grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
    for n0 in range(0, n, tile_n):
        n1 = min(n, n0 + tile_n)
        z_tile = z[n0:n1].float()
        g_tile = grad[n0:n1].float()
        for k0 in range(0, k, tile_k):
            k1 = min(k, k0 + tile_k)
            code_tile = codebook[k0:k1].float()
            probs = torch.exp(z_tile @ code_tile.T - lse[n0:n1, None])
            dlogits = probs * (g_tile @ code_tile.T - delta[n0:n1, None])
            grad_z[n0:n1] += dlogits @ code_tile
            grad_codebook[k0:k1] += dlogits.T @ z_tile
            del probs, dlogits
    return grad_z, grad_codebook


def entropy_backward(
    z: torch.Tensor,
    codebook: torch.Tensor,
    lse: torch.Tensor,
    row_entropy: torch.Tensor,
    log_avg_probs: torch.Tensor,
    scale: float,
    *,
    bias: torch.Tensor | None = None,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of L = mean_n H(p_n) - H(mean_n p_n), p = softmax((z C^T + b) * scale).

    With s = (z C^T + b) * scale, H_n the row entropy, log q_k = log of the mean distribution and
    E_n = sum_k p_nk log q_k:  dL/ds_nk = p_nk (log q_k - log p_nk - H_n - E_n) / N,
    and dl = dL/d(z C^T) = dL/db = scale * dL/ds. E_n needs a full pass over the codes before the gradient pass.
    Returns fp32 (dz, dC, db), db = sum_n dl_nk [K] (None without a bias).
    """
    n = z.shape[0]
    k = codebook.shape[0]
    tile_n, tile_k = tile_sizes(n, k, budget)
    coef = scale / n
    grad_z = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
    grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
    grad_bias = torch.zeros(k, dtype=torch.float32, device=z.device) if bias is not None else None
    for n0 in range(0, n, tile_n):
        n1 = min(n, n0 + tile_n)
        z_tile = z[n0:n1].float()
        row_lse = lse[n0:n1, None]
        cross = torch.zeros(n1 - n0, device=z.device)
        for k0 in range(0, k, tile_k):
            k1 = min(k, k0 + tile_k)
            probs = torch.exp(_tile_logits(z_tile, codebook, bias, k0, k1, scale) - row_lse)
            cross += probs @ log_avg_probs[k0:k1]
            del probs
        offset = (row_entropy[n0:n1] + cross)[:, None]
        for k0 in range(0, k, tile_k):
            k1 = min(k, k0 + tile_k)
            log_probs = _tile_logits(z_tile, codebook, bias, k0, k1, scale) - row_lse
            dlogits = torch.exp(log_probs) * (log_avg_probs[k0:k1] - log_probs - offset) * coef
            code_tile = codebook[k0:k1].float()
            grad_z[n0:n1] += dlogits @ code_tile
            grad_codebook[k0:k1] += dlogits.T @ z_tile
            if grad_bias is not None:
                grad_bias[k0:k1] += dlogits.sum(dim=0)
            del log_probs, dlogits
    return grad_z, grad_codebook, grad_bias


@dataclass
class LinearCEStats:
    """Per-row results of the linear cross-entropy forward over logits l = h W^T (h [N, C], W [V, C]).

    lse [N] fp32: log sum_v exp(l_nv).  target_logit [N] fp32: l_{n, y_n}.  argmax [N] int64: argmax_v l_nv.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    argmax: torch.Tensor


def linear_ce_tile_sizes(n: int, v: int, dim: int, upcast_weight: bool, budget: int | None = None):
    """(tile_n, tile_v) for the linear cross-entropy: the logit tile's temporaries and, for a bf16 weight, its fp32
    copy of the weight tile (tile_v x dim x 4 bytes, given half the budget) stay within `budget`."""
    budget = MEMORY_BUDGET_BYTES if budget is None else budget
    weight_budget = budget // 2 if upcast_weight else 0
    max_v = max(1, weight_budget // (4 * dim)) if upcast_weight else v
    return tile_sizes(n, min(v, max_v), budget - weight_budget)


def linear_cross_entropy_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, budget: int | None = None
) -> LinearCEStats:
    """lse, target logit and argmax of every row of l = h W^T, by an online log-sum-exp over vocabulary tiles.

    Vocabulary tiles are the outer loop (each weight tile is cast to fp32 once) and row tiles the inner one; every
    row keeps a running max m and s = sum exp(l - m), and a new max m' rescales s by exp(m - m').
    `labels` [N] must all lie in [0, V) (ignored rows are dropped by the caller).
    """
    n, dim = hidden.shape
    v = weight.shape[0]
    tile_n, tile_v = linear_ce_tile_sizes(n, v, dim, weight.dtype != torch.float32, budget)
    device = hidden.device
    run_max = torch.full((n,), -math.inf, device=device)
    run_sum = torch.zeros(n, device=device)
    run_idx = torch.zeros(n, dtype=torch.long, device=device)
    target = torch.zeros(n, device=device)
    for v0 in range(0, v, tile_v):
        v1 = min(v, v0 + tile_v)
        weight_tile = weight[v0:v1].float()
        for n0 in range(0, n, tile_n):
            n1 = min(n, n0 + tile_n)
            logits = hidden[n0:n1].float() @ weight_tile.T
            row_labels = labels[n0:n1]
            in_tile = (row_labels >= v0) & (row_labels < v1)
            local = (row_labels - v0).clamp(0, v1 - v0 - 1)
            target[n0:n1] += torch.where(in_tile, logits.gather(1, local[:, None]).squeeze(1), 0.0)
            tile_max, tile_idx = logits.max(dim=1)
            old_max = run_max[n0:n1]
            new_max = torch.maximum(old_max, tile_max)
            run_idx[n0:n1] = torch.where(tile_max > old_max, tile_idx + v0, run_idx[n0:n1])
            logits -= new_max[:, None]
            run_sum[n0:n1] = run_sum[n0:n1] * torch.exp(old_max - new_max) + logits.exp_().sum(dim=1)
            run_max[n0:n1] = new_max
            del logits  # free this tile before the next one is allocated
        del weight_tile
    return LinearCEStats(lse=run_max + torch.log(run_sum), target_logit=target, argmax=run_idx)


def linear_cross_entropy_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    *,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of L = sum_n (lse_n - l_{n, y_n}), l = h W^T, recomputing each logit tile.

    dl = softmax(l) - onehot(y),  dh = dl W [N, C],  dW = dl^T h [V, C]; both fp32, accumulated tile by tile.
    """
    n, dim = hidden.shape
    v = weight.shape[0]
    tile_n, tile_v = linear_ce_tile_sizes(n, v, dim, weight.dtype != torch.float32, budget)
    grad_hidden = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(v, dim, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, v, tile_v):
        v1 = min(v, v0 + tile_v)
        weight_tile = weight[v0:v1].float()
        for n0 in range(0, n, tile_n):
            n1 = min(n, n0 + tile_n)
            hidden_tile = hidden[n0:n1].float()
            dlogits = (hidden_tile @ weight_tile.T).sub_(lse[n0:n1, None]).exp_()
            row_labels = labels[n0:n1]
            hit = ((row_labels >= v0) & (row_labels < v1)).nonzero().squeeze(1)
            dlogits[hit, row_labels[hit] - v0] -= 1.0
            grad_hidden[n0:n1].addmm_(dlogits, weight_tile)
            grad_weight[v0:v1].addmm_(dlogits.T, hidden_tile)
            del dlogits
        del weight_tile
    return grad_hidden, grad_weight
