"""HF export from a 2-process ZeRO-3 checkpoint (issue 11), checked against independent readers: transformers loads
llm/, DeepSpeed's zero_to_fp32 consolidates the same checkpoint for the reference weights, the trainer's own
hand-off (gathered by GatheredParameters inside the run) must hold the same tensors, and `training.infer` runs on
the export. Bad checkpoints fail naming what is missing and leave no partial export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ETT_RUN_STEPS
from tests.tiny_configs import stage_config
from training.export import ExportError, export_checkpoint, load_handoff_state_dict, main

STEPS = ETT_RUN_STEPS
TAG = f"step{STEPS:08d}"


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def run(tiny_data, ett_zero3_run):
    """The shared 2-rank ZeRO-3 ETT run (tests/conftest.py), its checkpoint exported with small shards, and
    zero_to_fp32's consolidation of that checkpoint."""
    root = ett_zero3_run
    export = export_checkpoint(root / "run" / "checkpoints", root / "export", max_shard_size="40KB")
    # Imported here, not at the top, so that the suite collects without deepspeed (pytest -m gpu, bare machine).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reference = get_fp32_state_dict_from_zero_checkpoint(str(root / "run" / "checkpoints"), tag=TAG)
    return {"root": root, "export": export, "reference": reference, "data": tiny_data}


def test_transformers_loads_llm_and_logits_match(run):
    from transformers import AutoConfig, AutoModelForCausalLM

    from modeling.llm import DecoderLM
    from training.export import read_export_config, run_config_from_dict

    llm_dir = run["export"] / "llm"
    index = json.loads((llm_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the 40KB shard limit should give several shards"
    assert AutoConfig.from_pretrained(llm_dir).architectures == ["LlamaForCausalLM"]
    cfg = run_config_from_dict(read_export_config(run["export"])["config"])
    ours = DecoderLM(cfg.model.llm)
    ours.load_state_dict(_part(run["reference"], "llm."))
    hf = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    ids = torch.randint(0, cfg.model.llm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


def test_transformers_loads_text_tokenizer_with_special_tokens(run):
    from transformers import AutoConfig, AutoTokenizer

    from data_pipeline.text_tokenizer import SPECIAL_TOKENS, TextTokenizer

    llm_dir = run["export"] / "llm"
    hf_tok = AutoTokenizer.from_pretrained(llm_dir)
    original = TextTokenizer.load(run["data"] / "tokenizer")
    text = "three red glyphs on a blue background"
    assert hf_tok.encode(text, add_special_tokens=False) == original.encode(text)
    assert [hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [
        original.special_ids[t] for t in SPECIAL_TOKENS
    ]
    config = AutoConfig.from_pretrained(llm_dir)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        original.bos_id,
        original.eos_id,
        original.pad_id,
    )


def test_vision_tokenizer_reproduces_checkpoint_reconstructions(run):
    from modeling.tokenizer import VQTokenizer
    from training.export import read_export_config, run_config_from_dict

    cfg = run_config_from_dict(read_export_config(run["export"])["config"])
    reference = VQTokenizer(cfg.model.tokenizer)
    reference.load_state_dict(_part(run["reference"], "tokenizer."))
    exported = VQTokenizer.from_pretrained(run["export"] / "vision_tokenizer")
    images = torch.rand(3, 3, 24, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(exported.reconstruct(images), reference.reconstruct(images))
    assert torch.equal(exported.encode(images), reference.encode(images))


def test_export_matches_zero_to_fp32_and_the_trainers_handoff(run):
    """Every exported tensor equals zero_to_fp32's, and the trainer's own final/ hand-off (same step) holds the same."""
    exported = load_handoff_state_dict(run["export"])
    handoff = load_handoff_state_dict(run["root"] / "run" / "final")
    reference = {k: v for k, v in run["reference"].items() if not k.startswith("vq_loss.")}
    assert set(exported) == set(reference) == set(handoff)
    for key, value in reference.items():
        assert torch.equal(exported[key], value), key
        assert torch.equal(handoff[key], value), key
    manifest = json.loads((run["export"] / "ett_config.json").read_text())
    done = json.loads((run["root"] / "run" / "DONE").read_text())
    assert manifest["step"] == done["step"] == STEPS
    assert manifest["consumed_samples"] == done["consumed_samples"] > 0
    assert manifest["stage"] == "ett" and manifest["world_size"] == 2
    assert set(manifest["components"]) == {
        "llm",
        "vision_tokenizer",
        "projector",
        "visual_head",
        "discriminator",
    }


def test_bf16_export_is_the_rounded_fp32_export(run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_checkpoint(run["root"] / "run" / "checkpoints", tmp_path / "bf16", dtype="bf16")
    hf = AutoModelForCausalLM.from_pretrained(out / "llm")
    hf32 = AutoModelForCausalLM.from_pretrained(run["export"] / "llm", dtype=torch.float32)
    assert hf.dtype == torch.bfloat16
    for (name, p16), (_, p32) in zip(hf.named_parameters(), hf32.named_parameters()):
        assert torch.equal(p16, p32.to(torch.bfloat16)), name


def test_infer_commands_run_from_the_export(run, tmp_path, capsys):
    from modeling.tokenizer import VQTokenizer
    from training.export import read_export_config, run_config_from_dict
    from training.infer import caption, load_export, load_image
    from training.infer import main as infer

    rng = np.random.default_rng(0)
    image_path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (24, 48, 3), dtype=np.uint8), "RGB").save(image_path)
    export = str(run["export"])

    assert (
        infer(
            ["reconstruct", "--export", export, "--image", str(image_path), "--out", str(tmp_path / "r.png")]
        )
        == 0
    )
    cfg = run_config_from_dict(read_export_config(export)["config"])
    reference = VQTokenizer(cfg.model.tokenizer)
    reference.load_state_dict(_part(run["reference"], "tokenizer."))
    expected = reference.reconstruct(load_image(image_path, (24, 48)))[0]
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")), expected)

    capsys.readouterr()
    assert infer(["caption", "--export", export, "--image", str(image_path), "--greedy"]) == 0
    loaded = load_export(export)
    tokens = caption(loaded, load_image(image_path, loaded.image_size), greedy=True)
    assert capsys.readouterr().out.strip() == loaded.text_tokenizer.decode(tokens).strip()

    args = [
        "generate",
        "--export",
        export,
        "--prompt",
        "red letters",
        "--guidance-scale",
        "2",
        "--top-k",
        "8",
    ]
    for name in ("a.png", "b.png"):
        assert infer([*args, "--seed", "7", "--out", str(tmp_path / name)]) == 0
    assert infer([*args, "--seed", "8", "--out", str(tmp_path / "c.png")]) == 0
    first, again, other = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "c.png"))
    assert first.shape == (24, 48, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def _copy_checkpoint(run, tmp_path) -> Path:
    target = tmp_path / "checkpoints" / TAG
    shutil.copytree(run["root"] / "run" / "checkpoints" / TAG, target)
    return target


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"temporary export directories left behind: {leftovers}"


@pytest.mark.parametrize(
    "removed", ["zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_missing_shard_is_named_and_nothing_is_written(run, tmp_path, removed, capsys):
    checkpoint = _copy_checkpoint(run, tmp_path)
    (checkpoint / removed).unlink()
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=removed):
        export_checkpoint(checkpoint, out)
    _assert_nothing_written(out)
    assert main(["--checkpoint", str(checkpoint.parent), "--out", str(out)]) == 2
    assert removed in capsys.readouterr().err
    _assert_nothing_written(out)


def test_checkpoint_of_a_different_model_configuration_is_rejected(run, tmp_path):
    checkpoint = _copy_checkpoint(run, tmp_path)
    state_path = checkpoint / "trainer_state.json"
    trainer_state = json.loads(state_path.read_text())
    trainer_state["config"]["model"]["llm"]["num_layers"] = 3
    trainer_state["config"]["model"]["tokenizer"]["codebook_size"] = 48
    trainer_state["config"]["model"]["ett"]["visual_head"] = False
    state_path.write_text(json.dumps(trainer_state))
    out = tmp_path / "export"
    with pytest.raises(ExportError) as info:
        export_checkpoint(checkpoint, out)
    message = str(info.value)
    assert "missing tensors" in message and "llm.decoder.layers.2." in message
    assert "tokenizer.quantizer.embedding.weight: checkpoint (32, 16) vs config (48, 16)" in message
    assert "no place for" in message and "visual_head.weight" in message
    _assert_nothing_written(out)


def test_failed_export_keeps_the_previous_export(run, tmp_path, monkeypatch):
    """A failure after the LLM was written (here: in the vision tokenizer) removes the temporary directory and
    leaves the export already at --out untouched."""
    from modeling.tokenizer import VQTokenizer

    out = shutil.copytree(run["export"], tmp_path / "export")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def fail(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(VQTokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run["root"] / "run" / "checkpoints", out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.")]


def test_refuses_to_replace_a_directory_that_is_not_an_export(run, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an ETT export"):
        export_checkpoint(run["root"] / "run" / "checkpoints", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_incomplete_or_absent_checkpoint_is_named(run, tmp_path):
    checkpoint = _copy_checkpoint(run, tmp_path)
    (checkpoint / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="no COMPLETE marker"):
        export_checkpoint(checkpoint, tmp_path / "out")
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_checkpoint(checkpoint.parent, tmp_path / "out")
    with pytest.raises(ExportError, match="no such directory"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")


def test_run_config_of_an_older_version_with_tensor_parallel_size(tmp_path):
    """Checkpoints and exports written before tensor parallelism was removed carry model.llm.tensor_parallel_size=1,
    which still reads; any other value is refused naming the option."""
    from training.export import run_config_from_dict

    data = stage_config("ett", tmp_path, tmp_path / "run")
    data["model"]["llm"]["tensor_parallel_size"] = 1
    assert run_config_from_dict(data).model.llm.hidden_size == data["model"]["llm"]["hidden_size"]
    data["model"]["llm"]["tensor_parallel_size"] = 2
    with pytest.raises(ExportError, match="tensor_parallel_size: tensor parallelism was removed"):
        run_config_from_dict(data)
