"""Fused linear cross-entropy (modeling/kernels: linear_cross_entropy) against naive F.cross_entropy(h @ W.T).

The torch path runs here, with memory budgets that force several row and vocabulary tiles; the Triton kernels run
under the interpreter in a child process (TRITON_INTERPRET=1 must be set before the kernels are decorated), with
blocks and vocabulary splits that do not divide N, V or C. The LLM's head mode (tied and untied) must give the
logits path's loss and gradients, and under 2-rank ZeRO-3 the tied head trains as the unfused one does.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling.kernels import linear_cross_entropy, reference
from tests.conftest import REPO_ROOT, run_ranks
from tests.tiny_configs import write_stage_config

N, V, C = 131, 101, 24
INTERPRETER_ROWS = 37
INTERPRETER_CASES = {
    # name: (dtype, TritonConfig overrides)
    "fp32-two-splits": (torch.float32, dict(block_n=16, block_k=16, block_d=16, num_splits=2)),
    "bf16-auto-splits": (torch.bfloat16, dict(block_n=16, block_k=32, block_d=16, num_splits=None)),
}


def make_inputs(dtype, rows=N):
    """hidden [rows, C], weight [V, C] and labels [rows] with ignored rows and some labels that are the argmax."""
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, C, generator=gen).to(dtype)
    weight = (torch.randn(V, C, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, V, (rows,), generator=gen)
    labels[::3] = (hidden.float() @ weight.float().T).argmax(dim=1)[::3]
    labels[1::5] = -100
    return hidden, weight, labels


def naive(hidden, weight, labels):
    """Mean CE, dh, dW and the correct count, from the full fp32 logits."""
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    logits = h @ w.T
    loss = F.cross_entropy(logits, labels)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    correct = ((logits.argmax(dim=1) == labels) & (labels != -100)).sum()
    return loss.detach(), grad_h, grad_w, correct


def fused(hidden, weight, labels, **options):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    totals = linear_cross_entropy(h, w, labels, **options)
    loss = totals.loss_sum / totals.count
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), grad_h, grad_w, totals.correct, totals.count


def assert_matches_naive(result, hidden, weight, labels, rtol, atol):
    loss, grad_h, grad_w, correct, count = result
    ref_loss, ref_h, ref_w, ref_correct = naive(hidden, weight, labels)
    assert count == (labels != -100).sum() and correct == ref_correct > 0
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for actual, expected in ((grad_h, ref_h), (grad_w, ref_w)):
        torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol * expected.abs().max())


@pytest.mark.parametrize("budget, tiles", [(None, (N, V)), (16 * 64 * 63, (64, 63))])
def test_torch_path_matches_naive_fp32(budget, tiles):
    """One tile, and a budget that splits both the rows and the vocabulary (odd remainders)."""
    assert reference.linear_ce_tile_sizes(N, V, C, False, budget) == tiles
    hidden, weight, labels = make_inputs(torch.float32)
    result = fused(hidden, weight, labels, backend="torch", budget=budget)
    assert_matches_naive(result, hidden, weight, labels, rtol=1e-5, atol=1e-5)


def test_torch_path_bf16_inputs_accumulate_in_fp32():
    """A bf16 weight is cast to fp32 a vocabulary tile at a time, the copy within half the budget."""
    budget = 2 * 16 * 64 * 5
    assert reference.linear_ce_tile_sizes(N, V, C, True, budget) == (64, 5)
    hidden, weight, labels = make_inputs(torch.bfloat16)
    result = fused(hidden, weight, labels, backend="torch", budget=budget)
    assert result[1].dtype == result[2].dtype == torch.bfloat16
    assert_matches_naive(result, hidden, weight, labels, rtol=1e-2, atol=1e-2)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    hidden, weight, labels = make_inputs(torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    totals = linear_cross_entropy(h, w, torch.full_like(labels, -100), backend="torch")
    assert totals.count == totals.correct == 0 and totals.loss_sum == 0
    totals.loss_sum.backward()
    assert not h.grad.any() and not w.grad.any()


def test_bad_labels_are_refused_with_the_expected_range():
    hidden, weight, labels = make_inputs(torch.float32)
    labels[4] = V
    with pytest.raises(ValueError, match=rf"label {V} is outside \[0, {V}\)"):
        linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(ValueError, match="labels must be integer"):
        linear_cross_entropy(hidden, weight, labels[:-1])


def run_interpreter_cases(path: str) -> None:
    """Child-process entry point (TRITON_INTERPRET=1): the Triton backend on every case, torch.save'd."""
    from dataclasses import replace

    from modeling.kernels import triton_kernels

    results = {}
    for name, (dtype, overrides) in INTERPRETER_CASES.items():
        triton_kernels.CONFIG = replace(triton_kernels.CONFIG, **overrides)
        results[name] = fused(*make_inputs(dtype, INTERPRETER_ROWS), backend="triton")
    torch.save(results, path)


def test_triton_interpreter_matches_naive(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = f"from tests.test_linear_cross_entropy import run_interpreter_cases; run_interpreter_cases({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(path)
    for name, (dtype, _) in INTERPRETER_CASES.items():
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert_matches_naive(results[name], *make_inputs(dtype, INTERPRETER_ROWS), rtol=tol, atol=tol)


@pytest.mark.parametrize("tied", [True, False])
def test_llm_head_mode_matches_the_logits_path(tied):
    """DecoderLM's head mode (fused CE on hidden states) gives the loss, accuracy and every parameter's gradient
    of the plain logits + F.cross_entropy path, with the head tied to the embedding and untied."""
    from modeling.llm import DecoderLM, LLMConfig
    from training.objectives import caption_loss

    torch.manual_seed(0)
    model = DecoderLM(LLMConfig(vocab_size=97, hidden_size=32, num_heads=4, tie_embeddings=tied))
    input_ids = torch.randint(0, 97, (2, 11))
    labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[0, :3] = -100

    reference = caption_loss(model(input_ids=input_ids).logits, labels)
    ref_grads = torch.autograd.grad(reference[0], list(model.parameters()))
    hidden = model(input_ids=input_ids, with_logits=False).hidden_states
    totals = model(head_hidden=hidden, labels=labels)
    loss = totals.loss_sum / totals.count
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
    assert (totals.correct, totals.count) == (reference[1], reference[2])
    for (name, _), grad, ref_grad in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7, msg=name)


def test_tied_head_trains_under_zero3_as_without_fusion(tiny_data, tmp_path):
    """Text pretraining with the tied LM head (the tiny LLM's default) on 2-rank ZeRO-3: the fused head loss (the
    LLM's head mode, called by the objective after the engine's forward) gives the per-step losses of the logits
    path (model.ett.fused_head_loss=false) to float summation order."""
    from tests.test_train_stages import _losses

    sections = {"data": {"seq_len": 48}, "schedule": {"max_steps": 2}}
    for name, fused_head_loss in (("fused", True), ("plain", False)):
        config = write_stage_config(
            tmp_path / f"{name}.yaml",
            "llm_pretrain",
            tiny_data,
            tmp_path / name,
            model={"ett": {"fused_head_loss": fused_head_loss}},
            **sections,
        )
        run_ranks(2, ["--config", str(config), "--resume", "none"], tmp_path)
    fused_losses, plain_losses = _losses(tmp_path / "fused"), _losses(tmp_path / "plain")
    assert len(fused_losses) == len(plain_losses) == 2
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
