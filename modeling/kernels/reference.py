"""Chunked torch implementation of the codebook kernels: the CPU path and the correctness oracle.

Every function here tiles the N x K logits l = (z C^T + b) * scale into (tile_n x tile_k) blocks whose size
comes from a memory budget, and merges the blocks with online (flash-attention style) reductions, so no
N x K tensor ever exists. Inputs may be fp32 or bf16; all arithmetic is fp32.

Notation: z [N, D], C = codebook [K, D], bias b [K], p = softmax(l) over k, lse_n = log sum_k exp(l_nk).
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
