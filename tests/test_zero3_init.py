"""Under ZeRO-3, every stage kind's model gets the same weights as from a plain construction, and the trainer's
engine computes the same gradients as plain autograd.

zero.Init partitions each parameter as soon as its module is built, so an `nn.init.*_` applied after construction
is a silent no-op under ZeRO-3. The reference here is the plain (non-ZeRO) construction with the same seed; the
ZeRO-3 weights are gathered back with the project's own gather and compared bit for bit. The gradients are those
of the trainer's own engine (zero.Init, partitioned parameters, hooks per block: training.stages.set_zero3_blocks)
over accumulated micro-batches, against `backward()` on the plain model.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, child_env
from tests.tiny_configs import stage_config

# (stage kind, model.ett overrides): every kind, plus the index baseline and the visual head.
VARIANTS = [
    ("tokenizer", {}),
    ("llm_pretrain", {}),
    ("align", {}),
    ("ett", {}),
    ("ett", {"visual_input": "index"}),
    ("chat_sft", {}),
    ("t2i", {"visual_head": True}),
    ("t2i", {"visual_head": True, "visual_input": "index"}),
]

COMPARE = r"""
import json, sys
import torch
from training.config import from_dict
from training.engine import build_ds_config, gather_full_state_dict, init_distributed, model_init_context
from training.run_config import TrainConfig
from training.stages import build_model

init_distributed()
results = {}
for name, config in json.loads(sys.argv[1]).items():
    cfg = from_dict(TrainConfig, config)
    ds_config = build_ds_config(cfg, world_size=1)
    torch.manual_seed(7)
    plain = dict(build_model(cfg).state_dict())
    torch.manual_seed(7)
    with model_init_context(ds_config):
        partitioned = build_model(cfg)
    gathered = gather_full_state_dict(partitioned, rank=0)
    differ = sorted(k for k in plain if k not in gathered or not torch.equal(plain[k], gathered[k]))
    results[name] = {"compared": len(plain), "differ": differ}
print("RESULT", json.dumps(results))
"""


def differing(script: str, configs: dict) -> dict:
    """Run `script` (prints RESULT {name: {"compared": n, "differ": ...}}) on `configs` in a fresh process; return
    the non-empty "differ" entries by config name."""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(configs)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    assert sorted(results) == sorted(configs)
    assert all(r["compared"] > 0 for r in results.values())
    return {name: r["differ"] for name, r in results.items() if r["differ"]}


def test_zero3_construction_matches_plain_construction(tmp_path):
    configs = {
        f"{kind}:{json.dumps(ett)}": stage_config(
            kind,
            tmp_path,
            tmp_path / "run",
            model={"ett": ett},
            stage={"init_from": str(tmp_path), "train_tokenizer": False},
        )
        for kind, ett in VARIANTS
    }
    differ = differing(COMPARE, configs)
    assert not differ, f"weights differ under zero.Init: {differ}"


GRADIENTS = r"""
import json, sys
import torch
from deepspeed.utils import safe_get_full_grad
from training.config import from_dict
from training.engine import build_ds_config
from training.run_config import TrainConfig
from training.stages import build_model, model_inputs
from training.trainer import Trainer, seed_all

results = {}
for name, config in json.loads(sys.argv[1]).items():
    cfg = from_dict(TrainConfig, config)
    trainer = Trainer(cfg)
    trainer.build(build_ds_config(cfg, world_size=1), fresh=False)
    seed_all(cfg.train.seed)
    plain = build_model(cfg)
    spec, engine = trainer.spec, trainer.engine
    for _ in range(trainer.accum):
        inputs = model_inputs(next(trainer.loader), spec.batch_keys)
        engine.backward(trainer.forward_step(inputs).loss)
        out = plain(**{k: inputs[k] for k in spec.model_keys}, reconstruct=trainer.losses.vq_loss is not None)
        (spec.objective(out, inputs, trainer.losses, 0).loss / trainer.accum).backward()
    zero = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    reference = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert sorted(zero) == sorted(reference), name
    differ = {
        n: float("inf") if g is None else float((g - reference[n]).abs().max() / reference[n].abs().max())
        for n, g in zero.items()
        if g is None or not torch.equal(g, reference[n])
    }
    results[name] = {"compared": len(zero), "differ": differ}
print("RESULT", json.dumps(results))
"""


def test_zero3_gradients_are_plain_autograd_gradients(tiny_data, tmp_path):
    """ETT (tokenizer levels, mid blocks and LLM layers all trained) and LLM pretraining, parameters partitioned
    (persistence threshold 0), 4 micro-batches accumulated, with and without activation checkpointing: every
    gradient is bitwise the plain model's (per-module hooks gave up to 1e-5 relative off)."""
    configs = {
        f"{kind} checkpointing={ckpt}": stage_config(
            kind,
            tiny_data,
            tmp_path / f"{kind}-{ckpt}",
            model={"llm": {"activation_checkpointing": ckpt}, "tokenizer": {"loss": {"gan_weight": 0.0}}},
            deepspeed={"param_persistence_threshold": 0},
            stage={"init_from": str(tmp_path)},
        )
        for kind in ("ett", "llm_pretrain")
        for ckpt in (False, True)
    }
    differ = differing(GRADIENTS, configs)
    assert not differ, f"ZeRO-3 gradients differ from plain autograd (max relative difference): {differ}"


def test_zero3_blocks_refuse_a_trained_block_behind_a_frozen_entry(tmp_path):
    """A trained transformer layer whose stack's first parameter (the word embedding) is frozen gets no input that
    requires grad, so DeepSpeed's leaf hook reduces and releases it before its backward (tried: the backward then
    fails inside torch, "The size of tensor a (0) must match ..."). set_zero3_blocks names both and refuses."""
    from training.config import ConfigError, from_dict
    from training.run_config import TrainConfig
    from training.stages import build_model, set_zero3_blocks

    cfg = from_dict(TrainConfig, stage_config("llm_pretrain", tmp_path, tmp_path / "run"))
    model = build_model(cfg)
    model.llm.embedding.word_embeddings.weight.requires_grad_(False)
    with pytest.raises(
        ConfigError, match=r"llm\.decoder\.layers\.0 trains but llm\.embedding\.word_embeddings\.weight"
    ):
        set_zero3_blocks(model)
