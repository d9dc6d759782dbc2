"""GPU checks (`pytest -m gpu`; skipped without CUDA): the Triton codebook kernels at the paper's size against the
chunked torch reference, a bf16 ZeRO-3 ETT training run of the real train loop on CUDA (skipped without
deepspeed: benchmarks/gpu_check.sh installs it from the wheel folder), the FLOP accounting behind MFU (measured
matmul peak, the Triton kernels' FLOPs), and flash-attn against SDPA at Qwen-like head sizes. No timing
assertions: speed is measured by benchmarks/ (benchmarks/gpu_check.sh runs all of it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, child_env
from tests.tiny_configs import TINY_MODEL, merge

pytestmark = pytest.mark.gpu

# The paper's codebook: K = 131,072 codes of D = 256; N = 65,536 tokens (256 images of 16 x 16 codes).
PAPER_N, PAPER_K, PAPER_D = 65536, 131072, 256
ENTROPY_TEMPERATURE = 0.01


def _paper_inputs(seed: int = 0):
    """bf16 z [N, D] and codebook [K, D] on CUDA, scaled so that the logits z.c are ~N(0, 1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scale = PAPER_D**-0.25
    z = (torch.randn(PAPER_N, PAPER_D, device="cuda", generator=gen) * scale).to(torch.bfloat16)
    codebook = (torch.randn(PAPER_K, PAPER_D, device="cuda", generator=gen) * scale).to(torch.bfloat16)
    return z, codebook


def _exact_top2_and_chosen(z, codebook, indices_by_name, rows_per_chunk=4096):
    """fp32 logits of the (exactly representable) bf16 inputs, a chunk of rows at a time: the top-2 values per
    row and, for each named index vector, the logit of the chosen code."""
    codebook32 = codebook.float()
    top2, chosen = [], {name: [] for name in indices_by_name}
    for start in range(0, z.shape[0], rows_per_chunk):
        logits = z[start : start + rows_per_chunk].float() @ codebook32.T
        top2.append(logits.topk(2, dim=1).values)
        for name, indices in indices_by_name.items():
            chosen[name].append(logits.gather(1, indices[start : start + rows_per_chunk, None]).squeeze(1))
        del logits
    return torch.cat(top2), {name: torch.cat(values) for name, values in chosen.items()}


def _relative_error(actual, expected) -> float:
    expected = expected.float()
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def test_triton_codebook_kernels_match_chunked_reference_at_paper_size():
    from modeling.kernels import codebook_argmax, codebook_entropy_loss, ibq_straight_through

    z, codebook = _paper_inputs()

    # Forward: index = argmax_k z.c_k and the row log-sum-exp.
    idx_triton, lse_triton = codebook_argmax(z, codebook, backend="triton")
    idx_torch, lse_torch = codebook_argmax(z, codebook, backend="torch")
    top2, chosen = _exact_top2_and_chosen(z, codebook, {"triton": idx_triton, "torch": idx_torch})
    tol = 1e-3
    for name in ("triton", "torch"):
        worse = (top2[:, 0] - chosen[name]).max().item()
        assert worse <= tol, f"{name}: a chosen code is {worse:.3g} below the best logit"
    clear = top2[:, 0] - top2[:, 1] > tol
    assert clear.float().mean().item() > 0.9, "the inputs should have few near-ties"
    assert torch.equal(idx_triton[clear], idx_torch[clear])
    lse_error = (lse_triton.float() - lse_torch.float()).abs().max().item()
    assert lse_error <= 1e-3, f"log-sum-exp differs by {lse_error:.3g}"

    # IBQ straight-through: z_q = C[index] forward, softmax-attention gradients backward. Rows whose index
    # differs between the backends (near-ties) get a zero output gradient so that both compute the same thing.
    grad_out = torch.randn(
        PAPER_N, PAPER_D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)
    )
    grad_out = grad_out.to(torch.bfloat16)
    results = {}
    for backend in ("triton", "torch"):
        z_leaf, codebook_leaf = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        z_q, indices = ibq_straight_through(z_leaf, codebook_leaf, backend=backend)
        results[backend] = (z_leaf, codebook_leaf, z_q, indices)
    same = results["triton"][3] == results["torch"][3]
    assert same.float().mean().item() > 0.9
    masked_grad = grad_out * same[:, None].to(grad_out.dtype)
    grads = {}
    for backend, (z_leaf, codebook_leaf, z_q, indices) in results.items():
        assert torch.equal(z_q, codebook[indices])
        grads[backend] = torch.autograd.grad(z_q, [z_leaf, codebook_leaf], masked_grad)
    for which, triton_grad, torch_grad in zip(("dz", "dC"), grads["triton"], grads["torch"]):
        assert torch.isfinite(triton_grad).all()
        error = _relative_error(triton_grad, torch_grad)
        assert error <= 2e-2, f"IBQ {which}: max error {error:.3g} of the largest magnitude"
    del results, grads

    # Entropy loss (IBQ's codebook-usage term) and its gradients.
    losses, grads = {}, {}
    for backend in ("triton", "torch"):
        z_leaf, codebook_leaf = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        loss = codebook_entropy_loss(z_leaf, codebook_leaf, ENTROPY_TEMPERATURE, backend=backend)
        losses[backend] = loss.item()
        grads[backend] = torch.autograd.grad(loss, [z_leaf, codebook_leaf])
    assert math.isfinite(losses["triton"])
    assert abs(losses["triton"] - losses["torch"]) <= 1e-3 * max(1.0, abs(losses["torch"]))
    for which, triton_grad, torch_grad in zip(("dz", "dC"), grads["triton"], grads["torch"]):
        error = _relative_error(triton_grad, torch_grad)
        assert error <= 2e-2, f"entropy {which}: max error {error:.3g} of the largest magnitude"


_TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
from benchmarks.train_throughput import train_config
from training.train import run_stage
sections = json.loads(Path(sys.argv[1]).read_text())
sys.exit(run_stage(train_config(sections), "none"))
"""


def test_ett_bf16_training_steps_on_cuda(tiny_data, tmp_path):
    """The real train loop (training.train.run_stage), stage 2 on CUDA in bf16 under DeepSpeed ZeRO-3: batches go
    to the GPU in the engine's dtype, the Triton kernels run inside the tokenizer, and the loss is finite and goes
    down."""
    pytest.importorskip("deepspeed", reason="needs deepspeed (benchmarks/gpu_check.sh installs gpu_wheels/)")
    out = tmp_path / "run"
    model = merge(TINY_MODEL, {"tokenizer": {"loss": {"gan_weight": 0.0}}})
    sections = {
        "stage": {"name": "gpu_ett", "kind": "ett"},
        "model": model,
        "data": {
            "train": [{"path": str(tiny_data / "caption_train")}],
            "text_tokenizer": str(tiny_data / "tokenizer"),
            "image_size": [24, 48],
            "seq_len": 96,
        },
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 8, "warmup_ratio": 0.0, "kind": "constant"},
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "precision": "bf16",
            "output_dir": str(out),
            "log_every": 1,
            "progress": False,
        },
        "checkpoint": {"save_every": 0, "resume": "none"},
        "deepspeed": {"zero_stage": 3},
    }
    spec = tmp_path / "sections.json"
    spec.write_text(json.dumps(sections))
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_SCRIPT, str(spec)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    assert len(losses) == 8
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert not any("skipped/nonfinite" in r for r in records)


def test_mfu_peak_is_measured_and_triton_codebook_flops_are_counted():
    """training.flops on CUDA: the bf16 matmul peak is measured (a plausible H100/H200-class number, below the
    datasheet), and the forward FLOPs counted with the Triton kernels equal those counted on the torch path, where
    FlopCounterMode sees the GEMMs itself."""
    from modeling.kernels import codebook_entropy_loss, ibq_straight_through
    from training import flops

    flops._PEAK = None
    info = flops.peak_info(refresh=True)
    if info["source"] != "env":
        assert info["source"] == "measured", info
        assert 50e12 < info["flops_per_second"] < 2500e12, info
    n, k, d = 4096, 16384, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(n, d, device="cuda", generator=gen) * d**-0.25).to(torch.bfloat16).requires_grad_(True)
    codebook = (
        (torch.randn(k, d, device="cuda", generator=gen) * d**-0.25).to(torch.bfloat16).requires_grad_(True)
    )

    def forward(backend):
        z_q, _ = ibq_straight_through(z, codebook, backend=backend)
        return z_q.float().square().mean() + codebook_entropy_loss(z, codebook, 0.01, backend=backend)

    counts = {}
    for backend in ("torch", "triton"):
        counts[backend], _ = flops.count_forward_flops(forward, backend)
        counts[backend + "_breakdown"] = flops.last_forward_count()
    assert counts["triton_breakdown"]["codebook_forward_flops"] == 8 * n * k * d
    assert counts["torch_breakdown"]["codebook_forward_flops"] == 0
    assert counts["triton"] == counts["torch"], counts


def test_flash_attention_matches_sdpa_at_qwen_head_size():
    """flash-attn varlen against SDPA with a block-diagonal causal mask: head_dim 128, GQA 8/2, packed rows of
    2048 positions, bf16; outputs and gradients."""
    pytest.importorskip("flash_attn")
    from modeling.llm import DecoderLM, LLMConfig

    options = dict(
        vocab_size=4096,
        hidden_size=1024,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=2816,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    sdpa = DecoderLM(LLMConfig(**options, attention_backend="sdpa")).cuda().to(torch.bfloat16)
    flash = DecoderLM(LLMConfig(**options, attention_backend="flash")).cuda().to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    seq_len = 2048
    lengths = [[700, 900, 448], [1500, 300, 0]]  # the second row ends in 248 padding positions
    segment_ids = torch.zeros(2, seq_len, dtype=torch.long)
    for row, parts in enumerate(lengths):
        start = 0
        for sample, length in enumerate(parts, start=1):
            segment_ids[row, start : start + length] = sample
            start += length
    segment_ids = segment_ids.cuda()
    input_ids = torch.randint(0, options["vocab_size"], (2, seq_len), device="cuda")
    valid = segment_ids > 0

    outputs = {}
    for name, model in (("sdpa", sdpa), ("flash", flash)):
        logits = model(input_ids=input_ids, segment_ids=segment_ids).logits.float()
        loss = logits[valid].logsumexp(dim=-1).mean()
        loss.backward()
        grads = {
            n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None
        }
        outputs[name] = (logits.detach()[valid], grads)
    torch.testing.assert_close(outputs["flash"][0], outputs["sdpa"][0], atol=5e-2, rtol=5e-2)
    for param_name, reference in outputs["sdpa"][1].items():
        error = _relative_error(outputs["flash"][1][param_name], reference)
        assert error <= 5e-2, f"gradient of {param_name}: max error {error:.3g} of the largest magnitude"
