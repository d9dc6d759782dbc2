"""Triton kernels for the codebook ops: same functions and results as `reference.py`, tiled on the GPU.

Three kernels, each a flash-attention-style loop that recomputes a (BLOCK_N x BLOCK_K) logit tile in registers
and never writes N x K to memory (Q = z, K = V = C, softmax scale 1 for IBQ or 1/T for the entropy loss):

- `_row_stats_kernel`, grid (token blocks, code splits): online argmax, log-sum-exp, row entropy and soft
  output S C over the codes of its split. Splits (flash-decoding) give small-N calls enough programs; their
  partial results are merged in torch at O(splits * N * D) cost. Programs of one wave sweep the codebook in the
  same order, so each C tile is read from HBM about once per wave and served from L2 to the others.
- `_row_grad_kernel`, grid (token blocks): dz, looping over all codes (twice for the entropy loss: E, then dz).
- `_col_grad_kernel`, grid (code blocks): dC (or the column sums of p), looping over all tokens.

The backward recomputes the logits in both gradient kernels (as FlashAttention-2's two-pass backward does)
instead of using atomics. Every operand that is rounded to bf16 for a tl.dot is a per-element gradient weight
(dl_nk) or a probability, never a difference of large terms whose result is small: the entropy dz is built from
dl = coef p (log q - log p - H - E), as the dC pass does, after a first sweep for E, rather than as
A - (H + E) O, whose two terms nearly cancel when the distribution is sharp (T = 0.01): its bf16 operands gave
errors of 3e-2 to 1e0 of the largest dz against float64, the per-element form 1e-3 to 1e-2 (an emulation of
both at D = 256 in tests/test_kernels_bf16.py, which also runs these kernels with bf16 operand rounding).

bf16 inputs feed tl.dot as bf16 with fp32 accumulation; fp32 inputs use IEEE fp32 dots (TF32 when
torch.backends.cuda.matmul.allow_tf32 is set). Under TRITON_INTERPRET=1 the interpreter's bf16 dot is wrong
and its fp32 -> bf16 cast truncates, so for bf16 inputs every dot operand is instead rounded to the nearest bf16
(ties to even, `_dot_operand`) and kept in fp32 for an fp32 dot: bf16 x bf16 products are exact in fp32, so the
interpreter computes what the GPU computes up to summation order, including the operand rounding.

An optional per-code bias b [K] enters every kernel as l = (z C^T + b) * scale: IBQ uses none, VQ passes
b = -||c||^2 / 2 (argmax and entropy loss), so one set of kernels serves both at the code dim D <= MAX_DIM.

The linear cross-entropy of a classifier head (hidden h [N, C], weight W [V, C], C up to a few thousand) has its
own kernels, which sum each logit tile over hidden-dim blocks of `block_d` instead of holding a whole row:
`_linear_ce_stats_kernel` (grid: row blocks x vocabulary splits) for the online lse, argmax and target logit, and
`_linear_ce_grad_kernel` for dh (grid: row blocks) and dW (grid: vocabulary blocks), each recomputing the logits
and adding dl = softmax(l) - onehot(y) times W or h into its own rows of the fp32 output, without atomics.
"""

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from modeling.kernels.reference import LinearCEStats, RowStats

MAX_DIM = 256
"""Largest code dimension D: a whole row of z, C and the fp32 soft-output accumulator live in registers."""

MODE_IBQ = 0
MODE_ENTROPY = 1
MODE_PROB_SUM = 2


@dataclass
class TritonConfig:
    """Tile sizes and launch parameters. `num_splits=None` picks enough code splits to fill the GPU. The linear
    cross-entropy reads block_k as its vocabulary tile and num_splits as its vocabulary splits."""

    block_n: int = 64
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 2
    num_splits: int | None = None
    target_programs: int = 264
    block_d: int = 64
    """Hidden-dim tile of the linear cross-entropy kernels (the codebook kernels hold all of D at once)."""


CONFIG = TritonConfig()
"""Module-level default; tests and benchmarks replace fields to try other tilings."""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_settings(z: torch.Tensor, codebook: torch.Tensor) -> dict:
    """Kernel constexprs for tl.dot: operand dtype, input precision and the interpreter's bf16 rounding."""
    bf16 = z.dtype == torch.bfloat16 and codebook.dtype == torch.bfloat16
    if _interpreted():
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee", ROUND_BF16=bf16)
    if bf16:
        return dict(DOT_DTYPE=tl.bfloat16, PRECISION="ieee", ROUND_BF16=False)
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(DOT_DTYPE=tl.float32, PRECISION=precision, ROUND_BF16=False)


def _block_d(dim: int) -> int:
    if dim > MAX_DIM:
        raise ValueError(
            f"Triton codebook kernels support code dim D <= {MAX_DIM}, got {dim}; use backend='torch'"
        )
    return max(16, triton.next_power_of_2(dim))


@triton.jit
def _dot_operand(x, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """x as a tl.dot operand: cast to DOT_DTYPE; with ROUND_BF16 (interpreter, bf16 inputs) first rounded to the
    nearest bf16 with ties to even, in fp32 bits, which is what the GPU's cast to bf16 does (finite x)."""
    if ROUND_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DOT_DTYPE)


@triton.jit
def _scaled_logits(z, c, bias_ptr, offs_k, mask_k, scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """(z c^T + b) * scale for one (token block, code block) tile, fp32."""
    logits = tl.dot(z, tl.trans(c), input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    return logits * scale


@triton.jit
def _row_stats_kernel(
    z_ptr,
    c_ptr,
    bias_ptr,
    max_ptr,
    idx_ptr,
    sum_ptr,
    plogp_ptr,
    out_ptr,
    N,
    K,
    D,
    stride_zn,
    stride_ck,
    codes_per_split,
    scale,
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
    SOFT_OUTPUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """Per (token block, split): running max m, argmax, s = sum e^(l-m), a = sum e^(l-m)(l-m), o = sum e^(l-m) c."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    z = tl.load(
        z_ptr + offs_n[:, None] * stride_zn + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    )
    z = _dot_operand(z, DOT_DTYPE, ROUND_BF16)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_idx = tl.zeros((BLOCK_N,), tl.int32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_plogp = tl.zeros((BLOCK_N,), tl.float32)
    run_out = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    k_begin = split * codes_per_split
    k_end = tl.minimum(K, k_begin + codes_per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        c = tl.load(
            c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        c = _dot_operand(c, DOT_DTYPE, ROUND_BF16)
        logits = _scaled_logits(z, c, bias_ptr, offs_k, mask_k, scale, HAS_BIAS, PRECISION)
        logits = tl.where(mask_k[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_idx = tl.argmax(logits, axis=1) + k0
        run_idx = tl.where(tile_max > run_max, tile_idx, run_idx)
        new_max = tl.maximum(run_max, tile_max)
        rescale = tl.exp(run_max - new_max)
        shifted = logits - new_max[:, None]
        probs = tl.exp(shifted)
        if ENTROPY:
            shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            tile_plogp = tl.sum(probs * tl.where(mask_k[None, :], shifted, 0.0), axis=1)
            run_plogp = rescale * (run_plogp + shift * run_sum) + tile_plogp
        run_sum = rescale * run_sum + tl.sum(probs, axis=1)
        if SOFT_OUTPUT:
            run_out = run_out * rescale[:, None] + tl.dot(
                _dot_operand(probs, DOT_DTYPE, ROUND_BF16), c, input_precision=PRECISION, out_dtype=tl.float32
            )
        run_max = new_max

    row = split * N + offs_n
    tl.store(max_ptr + row, run_max, mask=mask_n)
    tl.store(idx_ptr + row, run_idx, mask=mask_n)
    tl.store(sum_ptr + row, run_sum, mask=mask_n)
    if ENTROPY:
        tl.store(plogp_ptr + row, run_plogp, mask=mask_n)
    if SOFT_OUTPUT:
        tl.store(
            out_ptr + row[:, None] * D + offs_d[None, :], run_out, mask=mask_n[:, None] & mask_d[None, :]
        )


@triton.jit
def _row_grad_kernel(
    z_ptr,
    c_ptr,
    g_ptr,
    bias_ptr,
    lse_ptr,
    delta_ptr,
    entropy_ptr,
    log_avg_ptr,
    dz_ptr,
    cross_ptr,
    N,
    K,
    D,
    stride_zn,
    stride_ck,
    stride_gn,
    scale,
    coef,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """dz = dl C for one token block, looping over all codes.

    IBQ: dl = p (g.c_k - delta).  Entropy: a first sweep gives E_n = sum_k p_nk log q_k (stored for the dC pass),
    then dl = coef * p (log q_k - log p - H - E), the per-element weight the dC pass uses too. (Not as
    A - (H + E) O with A = sum_k p (log q - log p) c and O = sum_k p c: same math, one sweep, but its bf16 operands
    p (log q - log p) are ~|log q| where dl is ~0, and the two terms cancel to ~1e-2 of their size at T = 0.01.)
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    z = tl.load(z_ptr + offs_n[:, None] * stride_zn + offs_d[None, :], mask=mask_nd, other=0.0)
    z = _dot_operand(z, DOT_DTYPE, ROUND_BF16)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    if MODE == 0:
        g = tl.load(g_ptr + offs_n[:, None] * stride_gn + offs_d[None, :], mask=mask_nd, other=0.0)
        g = _dot_operand(g, DOT_DTYPE, ROUND_BF16)
        delta = tl.load(delta_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        cross = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            c = tl.load(
                c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :],
                mask=mask_k[:, None] & mask_d[None, :],
                other=0.0,
            )
            c = _dot_operand(c, DOT_DTYPE, ROUND_BF16)
            log_probs = (
                _scaled_logits(z, c, bias_ptr, offs_k, mask_k, scale, HAS_BIAS, PRECISION) - lse[:, None]
            )
            probs = tl.where(mask_k[None, :], tl.exp(log_probs), 0.0)
            log_avg = tl.load(log_avg_ptr + offs_k, mask=mask_k, other=0.0)
            cross += tl.sum(probs * log_avg[None, :], axis=1)
        tl.store(cross_ptr + offs_n, cross, mask=mask_n)
        offset = tl.load(entropy_ptr + offs_n, mask=mask_n, other=0.0) + cross
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = tl.load(
            c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        c = _dot_operand(c, DOT_DTYPE, ROUND_BF16)
        log_probs = _scaled_logits(z, c, bias_ptr, offs_k, mask_k, scale, HAS_BIAS, PRECISION) - lse[:, None]
        probs = tl.where(mask_k[None, :], tl.exp(log_probs), 0.0)
        if MODE == 0:
            dprobs = tl.dot(g, tl.trans(c), input_precision=PRECISION, out_dtype=tl.float32)
            dlogits = probs * (dprobs - delta[:, None])
        else:
            log_avg = tl.load(log_avg_ptr + offs_k, mask=mask_k, other=0.0)
            dlogits = tl.where(
                mask_k[None, :], coef * probs * (log_avg[None, :] - log_probs - offset[:, None]), 0.0
            )
        acc += tl.dot(
            _dot_operand(dlogits, DOT_DTYPE, ROUND_BF16), c, input_precision=PRECISION, out_dtype=tl.float32
        )
    tl.store(dz_ptr + offs_n[:, None] * D + offs_d[None, :], acc, mask=mask_nd)


@triton.jit
def _col_grad_kernel(
    z_ptr,
    c_ptr,
    g_ptr,
    bias_ptr,
    lse_ptr,
    delta_ptr,
    offset_ptr,
    log_avg_ptr,
    dc_ptr,
    colsum_ptr,
    N,
    K,
    D,
    stride_zn,
    stride_ck,
    stride_gn,
    scale,
    coef,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """For one code block, sweeping all tokens: dC = dl^T z (IBQ, entropy) or the column sums of p (PROB_SUM).

    IBQ: dl = p (g.c - delta).  Entropy: dl = coef * p (log q_k - log p - offset_n) with offset = H + E, and with
    a bias also db = sum_n dl (into colsum).
    """
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < D
    c = tl.load(
        c_ptr + offs_k[:, None] * stride_ck + offs_d[None, :],
        mask=mask_k[:, None] & mask_d[None, :],
        other=0.0,
    )
    c = _dot_operand(c, DOT_DTYPE, ROUND_BF16)
    if MODE == 1:
        log_avg = tl.load(log_avg_ptr + offs_k, mask=mask_k, other=0.0)
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    colsum = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + offs_d[None, :], mask=mask_nd, other=0.0)
        z = _dot_operand(z, DOT_DTYPE, ROUND_BF16)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        valid = mask_n[:, None] & mask_k[None, :]
        log_probs = _scaled_logits(z, c, bias_ptr, offs_k, mask_k, scale, HAS_BIAS, PRECISION) - lse[:, None]
        probs = tl.where(valid, tl.exp(log_probs), 0.0)
        if MODE == 2:
            colsum += tl.sum(probs, axis=0)
        else:
            if MODE == 0:
                g = tl.load(g_ptr + offs_n[:, None] * stride_gn + offs_d[None, :], mask=mask_nd, other=0.0)
                g = _dot_operand(g, DOT_DTYPE, ROUND_BF16)
                delta = tl.load(delta_ptr + offs_n, mask=mask_n, other=0.0)
                dprobs = tl.dot(g, tl.trans(c), input_precision=PRECISION, out_dtype=tl.float32)
                dlogits = probs * (dprobs - delta[:, None])
            else:
                offset = tl.load(offset_ptr + offs_n, mask=mask_n, other=0.0)
                dlogits = tl.where(
                    valid, coef * probs * (log_avg[None, :] - log_probs - offset[:, None]), 0.0
                )
                if HAS_BIAS:
                    colsum += tl.sum(dlogits, axis=0)
            acc += tl.dot(
                tl.trans(_dot_operand(dlogits, DOT_DTYPE, ROUND_BF16)),
                z,
                input_precision=PRECISION,
                out_dtype=tl.float32,
            )
    if MODE == 2:
        tl.store(colsum_ptr + offs_k, colsum, mask=mask_k)
    else:
        tl.store(dc_ptr + offs_k[:, None] * D + offs_d[None, :], acc, mask=mask_k[:, None] & mask_d[None, :])
        if HAS_BIAS:
            tl.store(colsum_ptr + offs_k, colsum, mask=mask_k)


def _num_splits(n_blocks: int, k_blocks: int, config: TritonConfig) -> int:
    if config.num_splits is not None:
        return max(1, min(config.num_splits, k_blocks))
    return max(1, min(k_blocks, math.ceil(config.target_programs / n_blocks)))


def row_softmax_stats(
    z: torch.Tensor,
    codebook: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    entropy: bool = False,
    soft_output: bool = False,
    config: TritonConfig | None = None,
) -> RowStats:
    """Triton twin of `reference.row_softmax_stats`: split the codes, run `_row_stats_kernel`, merge the splits."""
    cfg = CONFIG if config is None else config
    z, codebook = z.contiguous(), codebook.contiguous()
    n, dim = z.shape
    k = codebook.shape[0]
    block_d = _block_d(dim)
    n_blocks = triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(k, cfg.block_k)
    splits = _num_splits(n_blocks, k_blocks, cfg)
    codes_per_split = triton.cdiv(k_blocks, splits) * cfg.block_k
    splits = triton.cdiv(k, codes_per_split)
    device = z.device
    part_max = torch.empty(splits, n, dtype=torch.float32, device=device)
    part_idx = torch.empty(splits, n, dtype=torch.int32, device=device)
    part_sum = torch.empty(splits, n, dtype=torch.float32, device=device)
    part_plogp = torch.empty(splits, n, dtype=torch.float32, device=device) if entropy else part_sum
    part_out = torch.empty(splits, n, dim, dtype=torch.float32, device=device) if soft_output else part_sum
    _row_stats_kernel[(n_blocks, splits)](
        z,
        codebook,
        bias.contiguous() if bias is not None else z,
        part_max,
        part_idx,
        part_sum,
        part_plogp,
        part_out,
        n,
        k,
        dim,
        z.stride(0),
        codebook.stride(0),
        codes_per_split,
        float(scale),
        HAS_BIAS=bias is not None,
        ENTROPY=entropy,
        SOFT_OUTPUT=soft_output,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_dot_settings(z, codebook),
    )
    best_max, best_split = part_max.max(dim=0)
    indices = part_idx.gather(0, best_split[None]).squeeze(0).long()
    weight = torch.exp(part_max - best_max)
    total = (weight * part_sum).sum(dim=0)
    lse = best_max + torch.log(total)
    row_entropy = None
    if entropy:
        plogp = (weight * (part_plogp + (part_max - best_max) * part_sum)).sum(dim=0)
        row_entropy = torch.log(total) - plogp / total
    soft = (weight[..., None] * part_out).sum(dim=0) / total[:, None] if soft_output else None
    return RowStats(indices=indices, lse=lse, entropy=row_entropy, soft_output=soft)


def _launch_common(
    z: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, cfg: TritonConfig
) -> dict:
    return dict(
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_D=_block_d(z.shape[1]),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_dot_settings(z, codebook),
    )


def column_prob_sum(
    z: torch.Tensor,
    codebook: torch.Tensor,
    lse: torch.Tensor,
    scale: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    config: TritonConfig | None = None,
) -> torch.Tensor:
    """Triton twin of `reference.column_prob_sum`: sum_n p_nk [K] fp32."""
    cfg = CONFIG if config is None else config
    z, codebook, lse = z.contiguous(), codebook.contiguous(), lse.contiguous()
    bias_arg = bias.contiguous() if bias is not None else lse
    n, dim = z.shape
    k = codebook.shape[0]
    colsum = torch.empty(k, dtype=torch.float32, device=z.device)
    _col_grad_kernel[(triton.cdiv(k, cfg.block_k),)](
        z, codebook, z, bias_arg, lse, lse, lse, lse, colsum, colsum,
        n, k, dim, z.stride(0), codebook.stride(0), 0, float(scale), 0.0,
        MODE=MODE_PROB_SUM, **_launch_common(z, codebook, bias, cfg),
    )  # fmt: skip
    return colsum


def ibq_backward(
    z: torch.Tensor,
    codebook: torch.Tensor,
    grad: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.ibq_backward`: fp32 (dz, dC) of the soft path, without the H^T g term."""
    cfg = CONFIG if config is None else config
    z, codebook, grad = z.contiguous(), codebook.contiguous(), grad.contiguous()
    lse, delta = lse.contiguous(), delta.contiguous()
    n, dim = z.shape
    k = codebook.shape[0]
    common = _launch_common(z, codebook, None, cfg)
    grad_z = torch.empty(n, dim, dtype=torch.float32, device=z.device)
    grad_codebook = torch.empty(k, dim, dtype=torch.float32, device=z.device)
    _row_grad_kernel[(triton.cdiv(n, cfg.block_n),)](
        z, codebook, grad, lse, lse, delta, lse, lse, grad_z, lse,
        n, k, dim, z.stride(0), codebook.stride(0), grad.stride(0), 1.0, 1.0,
        MODE=MODE_IBQ, **common,
    )  # fmt: skip
    _col_grad_kernel[(triton.cdiv(k, cfg.block_k),)](
        z, codebook, grad, lse, lse, delta, lse, lse, grad_codebook, lse,
        n, k, dim, z.stride(0), codebook.stride(0), grad.stride(0), 1.0, 1.0,
        MODE=MODE_IBQ, **common,
    )  # fmt: skip
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
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton twin of `reference.entropy_backward`: fp32 (dz, dC, db or None) of mean_n H(p_n) - H(mean_n p_n)."""
    cfg = CONFIG if config is None else config
    z, codebook = z.contiguous(), codebook.contiguous()
    lse, row_entropy, log_avg_probs = lse.contiguous(), row_entropy.contiguous(), log_avg_probs.contiguous()
    bias_arg = bias.contiguous() if bias is not None else lse
    n, dim = z.shape
    k = codebook.shape[0]
    coef = scale / n
    common = _launch_common(z, codebook, bias, cfg)
    grad_z = torch.empty(n, dim, dtype=torch.float32, device=z.device)
    grad_codebook = torch.empty(k, dim, dtype=torch.float32, device=z.device)
    grad_bias = torch.empty(k, dtype=torch.float32, device=z.device) if bias is not None else None
    cross = torch.empty(n, dtype=torch.float32, device=z.device)
    _row_grad_kernel[(triton.cdiv(n, cfg.block_n),)](
        z, codebook, z, bias_arg, lse, lse, row_entropy, log_avg_probs, grad_z, cross,
        n, k, dim, z.stride(0), codebook.stride(0), 0, float(scale), coef,
        MODE=MODE_ENTROPY, **common,
    )  # fmt: skip
    offset = row_entropy + cross
    _col_grad_kernel[(triton.cdiv(k, cfg.block_k),)](
        z, codebook, z, bias_arg, lse, lse, offset, log_avg_probs, grad_codebook,
        grad_bias if grad_bias is not None else lse,
        n, k, dim, z.stride(0), codebook.stride(0), 0, float(scale), coef,
        MODE=MODE_ENTROPY, **common,
    )  # fmt: skip
    return grad_z, grad_codebook, grad_bias


@triton.jit
def _linear_ce_logits(
    h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, C, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """l = h W^T for one (row block, vocab block) tile, fp32, summed over hidden-dim blocks of BLOCK_C."""
    logits = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        h = tl.load(
            h_ptr + offs_n[:, None] * stride_hn + offs_c[None, :],
            mask=mask_n[:, None] & mask_c[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_v[:, None] * stride_wv + offs_c[None, :],
            mask=mask_v[:, None] & mask_c[None, :],
            other=0.0,
        )
        logits += tl.dot(
            _dot_operand(h, DOT_DTYPE, ROUND_BF16),
            tl.trans(_dot_operand(w, DOT_DTYPE, ROUND_BF16)),
            input_precision=PRECISION,
            out_dtype=tl.float32,
        )
    return logits


@triton.jit
def _linear_ce_stats_kernel(
    h_ptr, w_ptr, labels_ptr, max_ptr, idx_ptr, sum_ptr, target_ptr,
    N, V, C, stride_hn, stride_wv, vocab_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """Per (row block, vocabulary split): running max m, argmax, s = sum e^(l - m) and the target logit l_{n, y_n}."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_idx = tl.zeros((BLOCK_N,), tl.int32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(V, v_begin + vocab_per_split)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        logits = _linear_ce_logits(
            h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, C, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_C, DOT_DTYPE, PRECISION, ROUND_BF16,
        )  # fmt: skip
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], logits, 0.0), axis=1)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_idx = tl.argmax(logits, axis=1) + v0
        run_idx = tl.where(tile_max > run_max, tile_idx, run_idx)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    row = split * N + offs_n
    tl.store(max_ptr + row, run_max, mask=mask_n)
    tl.store(idx_ptr + row, run_idx, mask=mask_n)
    tl.store(sum_ptr + row, run_sum, mask=mask_n)
    tl.store(target_ptr + row, target, mask=mask_n)


@triton.jit
def _linear_ce_grad_kernel(
    h_ptr, w_ptr, labels_ptr, lse_ptr, grad_ptr,
    N, V, C, stride_hn, stride_wv,
    GRAD_WEIGHT: tl.constexpr, BLOCK_OUTER: tl.constexpr, BLOCK_INNER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """dl = softmax(l) - onehot(y) recomputed tile by tile; dh = dl W for one row block sweeping the vocabulary, or
    (GRAD_WEIGHT) dW = dl^T h for one vocabulary block sweeping the rows. The program owns its rows of the fp32
    output (zero-initialised), so it adds each hidden-dim block of the product into memory without atomics."""
    pid = tl.program_id(0)
    if GRAD_WEIGHT:
        outer = V
        inner = N
    else:
        outer = N
        inner = V
    offs_outer = pid * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)
    mask_outer = offs_outer < outer
    for i0 in range(0, inner, BLOCK_INNER):
        offs_inner = i0 + tl.arange(0, BLOCK_INNER)
        mask_inner = offs_inner < inner
        if GRAD_WEIGHT:
            offs_n, mask_n, offs_v, mask_v = offs_inner, mask_inner, offs_outer, mask_outer
        else:
            offs_n, mask_n, offs_v, mask_v = offs_outer, mask_outer, offs_inner, mask_inner
        logits = _linear_ce_logits(
            h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, C, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_C, DOT_DTYPE, PRECISION, ROUND_BF16,
        )  # fmt: skip
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
        probs = tl.exp(logits - lse[:, None])
        onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
        dlogits = tl.where(mask_n[:, None] & mask_v[None, :], probs - onehot, 0.0)
        dlogits = _dot_operand(dlogits, DOT_DTYPE, ROUND_BF16)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if GRAD_WEIGHT:
                h = tl.load(
                    h_ptr + offs_n[:, None] * stride_hn + offs_c[None, :],
                    mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0,
                )
                part = tl.dot(
                    tl.trans(dlogits), _dot_operand(h, DOT_DTYPE, ROUND_BF16),
                    input_precision=PRECISION, out_dtype=tl.float32,
                )  # fmt: skip
            else:
                w = tl.load(
                    w_ptr + offs_v[:, None] * stride_wv + offs_c[None, :],
                    mask=mask_v[:, None] & mask_c[None, :],
                    other=0.0,
                )
                part = tl.dot(
                    dlogits,
                    _dot_operand(w, DOT_DTYPE, ROUND_BF16),
                    input_precision=PRECISION,
                    out_dtype=tl.float32,
                )
            out_ptrs = grad_ptr + offs_outer[:, None] * C + offs_c[None, :]
            out_mask = mask_outer[:, None] & mask_c[None, :]
            tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + part, mask=out_mask)


def _linear_ce_launch(hidden: torch.Tensor, weight: torch.Tensor, cfg: TritonConfig) -> dict:
    return dict(
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_k,
        BLOCK_C=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_dot_settings(hidden, weight),
    )


def linear_cross_entropy_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, config: TritonConfig | None = None
) -> LinearCEStats:
    """Triton twin of `reference.linear_cross_entropy_stats`: split the vocabulary, run `_linear_ce_stats_kernel`,
    merge the splits (lse by their maxima, argmax of the best split, target logit from the split that holds it)."""
    cfg = CONFIG if config is None else config
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    n, dim = hidden.shape
    v = weight.shape[0]
    n_blocks = triton.cdiv(n, cfg.block_n)
    v_blocks = triton.cdiv(v, cfg.block_k)
    splits = _num_splits(n_blocks, v_blocks, cfg)
    vocab_per_split = triton.cdiv(v_blocks, splits) * cfg.block_k
    splits = triton.cdiv(v, vocab_per_split)
    part_max, part_sum, part_target = (
        torch.empty(splits, n, dtype=torch.float32, device=hidden.device) for _ in range(3)
    )
    part_idx = torch.empty(splits, n, dtype=torch.int32, device=hidden.device)
    _linear_ce_stats_kernel[(n_blocks, splits)](
        hidden, weight, labels, part_max, part_idx, part_sum, part_target,
        n, v, dim, hidden.stride(0), weight.stride(0), vocab_per_split,
        **_linear_ce_launch(hidden, weight, cfg),
    )  # fmt: skip
    best_max, best_split = part_max.max(dim=0)
    lse = best_max + torch.log((torch.exp(part_max - best_max) * part_sum).sum(dim=0))
    argmax = part_idx.gather(0, best_split[None]).squeeze(0).long()
    return LinearCEStats(lse=lse, target_logit=part_target.sum(dim=0), argmax=argmax)


def linear_cross_entropy_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    *,
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.linear_cross_entropy_backward`: fp32 (dh, dW) of sum_n (lse_n - l_{n, y_n})."""
    cfg = CONFIG if config is None else config
    hidden, weight, labels, lse = (
        hidden.contiguous(),
        weight.contiguous(),
        labels.contiguous(),
        lse.contiguous(),
    )
    n, dim = hidden.shape
    v = weight.shape[0]
    launch = _linear_ce_launch(hidden, weight, cfg)
    grad_hidden = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(v, dim, dtype=torch.float32, device=hidden.device)
    for grad, outer, block_outer, block_inner, grad_weight_pass in (
        (grad_hidden, n, cfg.block_n, cfg.block_k, False),
        (grad_weight, v, cfg.block_k, cfg.block_n, True),
    ):
        _linear_ce_grad_kernel[(triton.cdiv(outer, block_outer),)](
            hidden, weight, labels, lse, grad, n, v, dim, hidden.stride(0), weight.stride(0),
            GRAD_WEIGHT=grad_weight_pass, BLOCK_OUTER=block_outer, BLOCK_INNER=block_inner, **launch,
        )  # fmt: skip
    return grad_hidden, grad_weight
