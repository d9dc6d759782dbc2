"""The demo recipe end to end at a tiny size (report and figures written, numbers in range), and chat SFT's loss
masking (user turns contribute nothing to the loss)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT, child_env
from tests.tiny_configs import stage_config

DEMO_RECIPE = Path(REPO_ROOT) / "examples" / "demo" / "recipe.yaml"


def tiny_demo_recipe(out_dir: Path) -> Path:
    """The demo recipe with its own output directory, tiny data, seed 1 only and the tiny test model."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["output_dir"] = str(out_dir)
    recipe.pop("templates")
    recipe["steps"] = [s for s in recipe["steps"] if not s["name"].startswith(("s2_", "s3_"))]
    data = next(s for s in recipe["steps"] if s["name"] == "data")
    data["args"].update(num_train=160, num_eval=24)
    recipe["defaults"]["model"]["llm"].update(hidden_size=32, intermediate_size=64)
    recipe["defaults"]["model"]["tokenizer"].update(codebook_size=32, base_channels=4, norm_groups=4)
    path = out_dir.parent / "tiny_demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_demo_recipe_runs_and_writes_the_report(tmp_path):
    out_dir = tmp_path / "demo"
    recipe = tiny_demo_recipe(out_dir)
    result = subprocess.run(
        [sys.executable, "-m", "training.pipeline", "--config", str(recipe), "schedule.max_steps=2"],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report_dir = out_dir / "report"
    report = (report_dir / "report.md").read_text()
    for name in ("loss_curves.png", "captions.png", "reconstructions.png", "t2i_samples.png"):
        assert (report_dir / name).stat().st_size > 1000, name
        assert f"({name})" in report, f"report.md does not show {name}"
    results = json.loads((report_dir / "results.json").read_text())
    assert results["num_images"] == 24
    assert set(results["arms"]) == {"ett", "ett_alpha0", "frozen_emb", "frozen_index", "control_frozen_index"}
    for arm, per_seed in results["arms"].items():
        assert list(per_seed) == ["1"], arm
        metrics = per_seed["1"]
        for key in ("word_exact_match", "char_accuracy", "colour_accuracy", "usage"):
            assert 0.0 <= metrics[key] <= 1.0, (arm, key, metrics[key])
        assert 3.0 < metrics["psnr"] < 60.0 and -1.0 <= metrics["ssim"] <= 1.0, (arm, metrics)
        for key in ("word_exact_match", "char_accuracy"):
            lo, hi = metrics[f"{key}_ci"]
            assert 0.0 <= lo <= metrics[key] + 1e-9 and metrics[key] - 1e-9 <= hi <= 1.0, (arm, key, metrics)
        per_image = results["per_image"][arm]["1"]
        assert len(per_image["word_exact_match"]) == len(per_image["char_accuracy"]) == 24, arm
        assert sum(per_image["word_exact_match"]) / 24 == pytest.approx(metrics["word_exact_match"]), arm
    comparison = results["ett_minus_best_frozen"]["1"]
    assert comparison["best_frozen"] in ("frozen_emb", "frozen_index", "control_frozen_index")
    for key in ("word_exact_match", "char_accuracy"):
        lo, hi = comparison[f"{key}_ci"]
        assert -1.0 <= lo <= comparison[key] + 1e-9 and comparison[key] - 1e-9 <= hi <= 1.0, (key, comparison)
    psnr = results["psnr_before_after"]["1"]
    assert psnr["ett_minus_stage0"] == pytest.approx(psnr["ett"] - psnr["stage0"])
    frozen = results["arms"]["frozen_emb"]["1"]["psnr"]
    assert frozen == pytest.approx(results["tokenizers"]["stage0 (before stage 2)"]["psnr"], abs=1e-6), (
        "a frozen arm must reconstruct exactly like the stage-0 tokenizer"
    )
    t2i = results["t2i"]
    assert t2i["grids_ok"] == len(t2i["prompts"]) == 8
    assert 0.0 <= results["chat"]["char_accuracy"] <= 1.0
    assert "| 1 | ETT (alpha 0.25) |" in report and "## Verdict" in report
    for heading in (
        "| seed | arm | word exact-match [95% CI] | character accuracy [95% CI] | PSNR (dB) | codebook usage |",
        "## ETT minus the best frozen arm",
        "## Reconstruction before and after stage 2",
        "## Paper claims",
    ):
        assert heading in report, heading
    for claim in ("- Claim 2, ", "- Claim 3, ", "- Claim 4, ", "- Claim 6, "):
        assert claim in report, claim
    assert "of 1 seeds" in report
    assert "report written to" in result.stdout


def test_stage2_example_config_loads_and_continues_the_demo(tiny_data, tmp_path):
    """examples/stage2_ett.yaml is a valid stage config (paths moved to the test data) whose model is the demo's."""
    from training.config import load_config
    from training.run_config import TrainConfig

    example = Path(REPO_ROOT) / "examples" / "stage2_ett.yaml"
    text = example.read_text().replace("runs/demo/s1_align/final", str(tmp_path))
    path = tmp_path / "stage2_ett.yaml"
    path.write_text(text.replace("runs/demo/data", str(tiny_data)))
    cfg = load_config(TrainConfig, path, [f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.stage.kind == "ett" and cfg.stage.init_from == str(tmp_path)
    raw = yaml.safe_load(example.read_text())
    assert raw["model"] == yaml.safe_load(DEMO_RECIPE.read_text())["defaults"]["model"]


def _chat_batch(tiny_data, tmp_path):
    from training.config import from_dict
    from training.data import build_train_loader
    from training.run_config import TrainConfig

    cfg = from_dict(
        TrainConfig,
        stage_config(
            "chat_sft",
            tiny_data,
            tmp_path / "run",
            stage={"init_llm_from": str(tmp_path)},
            data={"seq_len": 128},
        ),
    )
    return cfg, next(build_train_loader(cfg, 0, 1))


def _assistant_targets(input_ids: torch.Tensor, segment_ids: torch.Tensor, tok) -> torch.Tensor:
    """Naive reference: position t is a loss target iff token t+1 of the same sample lies in an assistant turn
    (after an ASSISTANT marker and before the next USER marker), and is not the marker itself."""
    targets = torch.zeros_like(input_ids, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        role = None
        for t in range(input_ids.shape[1]):
            token = int(input_ids[b, t])
            if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                role = None
            if token in (tok.user_id, tok.assistant_id):
                role = token
                continue
            if role == tok.assistant_id and t > 0 and segment_ids[b, t] == segment_ids[b, t - 1] != 0:
                targets[b, t - 1] = True
    return targets


def test_chat_sft_loss_leaves_user_turns_out(tiny_data, tmp_path):
    from data_pipeline.text_tokenizer import TextTokenizer
    from modeling.ett import ETTModel
    from training.objectives import LossModules, caption_loss
    from training.stages import STAGES

    cfg, batch = _chat_batch(tiny_data, tmp_path)
    tok = TextTokenizer.load(cfg.data.text_tokenizer)
    expected = _assistant_targets(batch["input_ids"], batch["segment_ids"], tok)
    labelled = batch["labels"] != -100
    assert expected.any() and torch.equal(labelled, expected), "chat labels do not match the assistant spans"
    shifted = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, -1:]], dim=1)
    assert torch.equal(batch["labels"][labelled], shifted[labelled])

    torch.manual_seed(0)
    model = ETTModel(cfg.model.llm, cfg.model.tokenizer, cfg.model.projector, cfg.model.ett)
    image_embeds, _ = model.image_embeddings(batch["images"])
    embeds = model.input_embeddings(batch["input_ids"], batch["image_mask"], image_embeds)
    logits = model.llm(
        inputs_embeds=embeds, position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
    ).logits.detach()
    logits.requires_grad_(True)
    loss = caption_loss(logits, batch["labels"])[0]
    loss.backward()
    grad_per_position = logits.grad.abs().sum(-1)
    user_positions = (batch["segment_ids"] > 0) & ~expected
    assert user_positions.any()
    assert torch.all(grad_per_position[user_positions] == 0), "the loss reads predictions inside user turns"
    assert torch.all(grad_per_position[expected] > 0)

    reference = torch.nn.functional.cross_entropy(logits.detach()[expected], shifted[expected])
    assert math.isclose(float(loss.detach()), float(reference), rel_tol=1e-5)
    with torch.no_grad():
        spec = STAGES["chat_sft"]
        outputs = model(**{k: batch[k] for k in spec.model_keys})
        full = spec.objective(outputs, batch, LossModules(), 0)
    assert math.isclose(float(full.loss), float(reference), rel_tol=1e-4), (
        "chat_sft objective != naive reference"
    )
