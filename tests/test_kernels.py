"""Codebook kernels, chunked torch path: checked against naive fp64 full-materialisation references.

The references build the whole N x K logit matrix in float64 and differentiate it with autograd, written the way
the IBQ code does it (one_hot = H - sg(S) + S; softmax + log_softmax entropy), so they share no code with
modeling/kernels.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling.kernels import (
    codebook_argmax,
    codebook_entropy_loss,
    ibq_straight_through,
    reference,
    resolve_backend,
)

SHAPE = (37, 70, 16)
TINY_BUDGET = 16 * 8 * 7  # tiles of 8 x 7 logits: both N and K are tiled, with ragged last tiles


def make_inputs(n, k, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=gen).to(dtype)
    codebook = torch.randn(k, dim, generator=gen).to(dtype)
    return z, codebook


def naive_ibq(z64, codebook64):
    """IBQ `IndexPropagationQuantize`: z_q = (H - sg(S) + S) C, computed densely."""
    soft = torch.softmax(z64 @ codebook64.T, dim=1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=1), codebook64.shape[0]).to(soft.dtype)
    return (hard - soft.detach() + soft) @ codebook64


def naive_entropy_loss(z64, codebook64, temperature, bias64=None):
    logits = z64 @ codebook64.T
    if bias64 is not None:
        logits = logits + bias64
    logits = logits / temperature
    probs = torch.softmax(logits, dim=1)
    sample_entropy = -(probs * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    avg = probs.mean(dim=0)
    return sample_entropy + (avg * torch.log(avg.clamp_min(1e-300))).sum()


def assert_argmax_consistent(logits64, indices, tol):
    """The chosen code is within `tol` of the best logit; rows with a top-2 margin above tol match exactly."""
    best = logits64.max(dim=1).values
    chosen = logits64.gather(1, indices[:, None]).squeeze(1)
    assert (best - chosen <= tol).all(), f"chosen code worse by {(best - chosen).max().item():.3g} > {tol}"
    top2 = logits64.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > tol
    assert clear.any()
    assert torch.equal(indices[clear], logits64.argmax(dim=1)[clear])


@pytest.fixture(params=[None, TINY_BUDGET], ids=["whole-rows", "tiled-n-and-k"])
def budget(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(reference, "MEMORY_BUDGET_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_and_lse_match_naive(budget, dtype):
    z, codebook = make_inputs(*SHAPE, dtype=dtype)
    bias = torch.randn(SHAPE[1])
    indices, lse = codebook_argmax(z, codebook, bias)
    logits = z.double() @ codebook.double().T + bias.double()
    assert indices.dtype == torch.int64 and lse.dtype == torch.float32
    assert_argmax_consistent(logits, indices, tol=1e-4)
    torch.testing.assert_close(lse.double(), logits.logsumexp(dim=1), rtol=1e-5, atol=1e-5)


def test_vq_bias_gives_nearest_code_by_cdist(budget):
    z, codebook = make_inputs(*SHAPE)
    indices, _ = codebook_argmax(z, codebook, bias=-0.5 * codebook.pow(2).sum(dim=1))
    dist = torch.cdist(z.double(), codebook.double())
    assert_argmax_consistent(-dist.pow(2) / 2, indices, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ibq_straight_through_matches_naive(budget, dtype):
    z, codebook = make_inputs(*SHAPE, dtype=dtype)
    z.requires_grad_(True)
    codebook.requires_grad_(True)
    grad_out = torch.randn(SHAPE[0], SHAPE[2], generator=torch.Generator().manual_seed(1))
    z_q, indices = ibq_straight_through(z, codebook)
    assert z_q.dtype == dtype and not indices.requires_grad
    assert torch.equal(z_q.detach(), codebook.detach()[indices])
    grad_z, grad_codebook = torch.autograd.grad(z_q, [z, codebook], grad_out.to(dtype))

    z64 = z.detach().double().requires_grad_(True)
    codebook64 = codebook.detach().double().requires_grad_(True)
    ref = naive_ibq(z64, codebook64)
    assert_argmax_consistent(z64.detach() @ codebook64.detach().T, indices, tol=1e-4)
    ref_grad_z, ref_grad_codebook = torch.autograd.grad(ref, [z64, codebook64], grad_out.to(dtype).double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_z.double(), ref_grad_z, **tol)
    torch.testing.assert_close(grad_codebook.double(), ref_grad_codebook, **tol)


@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_entropy_loss_matches_naive(budget, temperature):
    z, codebook = make_inputs(*SHAPE)
    z.requires_grad_(True)
    codebook.requires_grad_(True)
    loss = codebook_entropy_loss(z, codebook, temperature)
    grads = torch.autograd.grad(2.0 * loss, [z, codebook])

    z64 = z.detach().double().requires_grad_(True)
    codebook64 = codebook.detach().double().requires_grad_(True)
    ref = naive_entropy_loss(z64, codebook64, temperature)
    ref_grads = torch.autograd.grad(2.0 * ref, [z64, codebook64])
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    for grad, ref_grad in zip(grads, ref_grads):
        scale = ref_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=1e-3)


@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_entropy_loss_with_bias_matches_naive(budget, temperature):
    """The per-code bias (VQ's -||c||^2 / 2) enters the logits and gets its own gradient, sum_n dl_nk."""
    z, codebook = make_inputs(*SHAPE)
    bias = -0.5 * codebook.pow(2).sum(dim=1)
    leaves = [t.clone().requires_grad_(True) for t in (z, codebook, bias)]
    loss = codebook_entropy_loss(leaves[0], leaves[1], temperature, bias=leaves[2])
    grads = torch.autograd.grad(2.0 * loss, leaves)

    leaves64 = [t.double().requires_grad_(True) for t in (z, codebook, bias)]
    ref = naive_entropy_loss(*leaves64[:2], temperature, leaves64[2])
    ref_grads = torch.autograd.grad(2.0 * ref, leaves64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        scale = ref_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=1e-3)


def test_entropy_loss_without_bias_is_unchanged_by_a_zero_bias(budget):
    z, codebook = make_inputs(*SHAPE)
    assert torch.equal(
        codebook_entropy_loss(z, codebook), codebook_entropy_loss(z, codebook, bias=torch.zeros(SHAPE[1]))
    )


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage produced by any aten op run under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def test_chunked_path_stays_within_memory_budget(monkeypatch):
    n, k, dim = 256, 1024, 2
    budget = 128 * 1024  # the N x K fp32 logits need 1 MiB, 8x the budget; K x D fp32 is 8 KiB
    monkeypatch.setattr(reference, "MEMORY_BUDGET_BYTES", budget)
    z, codebook = make_inputs(n, k, dim)
    z.requires_grad_(True)
    codebook.requires_grad_(True)
    with LargestAllocation() as tracker:
        z_q, _ = ibq_straight_through(z, codebook)
        loss = (z_q * z_q).sum() + codebook_entropy_loss(z, codebook) + codebook_argmax(z, codebook)[1].sum()
        loss.backward()
    assert tracker.largest <= budget, f"largest temporary {tracker.largest} B exceeds the {budget} B budget"

    with LargestAllocation() as naive_tracker:
        naive_ibq(z.detach(), codebook.detach())
    assert naive_tracker.largest >= n * k * 4


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


HOST_SYNC_OPS = {"_local_scalar_dense", "bincount", "nonzero", "unique", "_unique2", "masked_select", "item"}
"""Ops that read a value back to the host on CUDA (.item(), int(), bool()) or whose output shape depends on data."""


@pytest.mark.parametrize("quantizer", ["ibq", "vq"])
def test_quantizer_training_forward_and_backward_have_no_host_sync(quantizer):
    """The quantizer's hot path (training forward with the entropy loss, usage statistics, backward) runs no op
    that would synchronise a CUDA stream with the host."""
    from modeling.tokenizer.config import TokenizerConfig
    from modeling.tokenizer.quantizers import build_quantizer

    module = build_quantizer(TokenizerConfig(quantizer=quantizer, code_dim=8, codebook_size=32)).train()
    assert module.use_entropy
    z = torch.randn(2, 8, 3, 4, requires_grad=True)
    with RecordOps() as recorder:
        out = module(z)
        (out.quantized.sum() + out.losses["quant"] + out.losses["entropy"]).backward()
    assert set(out.stats) == {"perplexity", "usage"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.stats.values())
    assert not recorder.ops & HOST_SYNC_OPS, sorted(recorder.ops & HOST_SYNC_OPS)


def test_tile_sizes_respect_budget():
    for n, k, budget in [(65536, 131072, 256 * 2**20), (37, 70, TINY_BUDGET), (10, 10**6, 1024)]:
        tile_n, tile_k = reference.tile_sizes(n, k, budget)
        assert 1 <= tile_n <= n and 1 <= tile_k <= k
        assert tile_n * tile_k * reference.BYTES_PER_LOGIT <= budget
    assert reference.tile_sizes(37, 70, 10**9) == (37, 70)
    with pytest.raises(ValueError, match="memory budget"):
        reference.tile_sizes(4, 4, 8)


def test_backend_dispatch(monkeypatch):
    z, _ = make_inputs(4, 8, 2)
    assert resolve_backend(z) is reference
    monkeypatch.setenv("ETT_KERNEL_BACKEND", "torch")
    assert resolve_backend(z) is reference
    monkeypatch.setenv("ETT_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ETT_KERNEL_BACKEND"):
        resolve_backend(z)
    monkeypatch.delenv("ETT_KERNEL_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend(z, "triton")


@pytest.mark.parametrize(
    "z_shape, codebook_shape, dtype, match",
    [
        ((2, 3, 4), (8, 4), torch.float32, r"z must be \[N, D\]"),
        ((5, 4), (8, 3), torch.float32, "does not match codebook dim"),
        ((5, 4), (8, 4), torch.float16, "float32 or bfloat16"),
        ((0, 4), (8, 4), torch.float32, "non-empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(z_shape, codebook_shape, dtype, match):
    z = torch.randn(z_shape).to(dtype)
    codebook = torch.randn(codebook_shape).to(dtype)
    for op in (codebook_argmax, ibq_straight_through, codebook_entropy_loss):
        with pytest.raises(ValueError, match=match):
            op(z, codebook)


def test_bad_bias_and_temperature_raise():
    z, codebook = make_inputs(5, 8, 4)
    with pytest.raises(ValueError, match=r"bias must be \[K\] = \[8\]"):
        codebook_argmax(z, codebook, torch.zeros(7))
    with pytest.raises(ValueError, match=r"bias must be \[K\] = \[8\]"):
        codebook_entropy_loss(z, codebook, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="temperature"):
        codebook_entropy_loss(z, codebook, temperature=0.0)
