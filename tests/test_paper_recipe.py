"""The paper's recipe (training/recipes/paper/recipe.yaml): loaded with training.pipeline's own loader, every train
step's stage config validates as a TrainConfig (with its data, parts and hand-off paths pointed at directories this
test creates), and the values the paper states are the ones written."""

import json
from pathlib import Path

import pytest
import yaml

from modeling.llm import LLMConfig
from training import pipeline
from training.config import ConfigError, load_config
from training.engine import build_ds_config, resolve_ds_config_path
from training.run_config import TrainConfig
from training.stages import STAGES

RECIPE = Path(__file__).resolve().parents[1] / "training" / "recipes" / "paper" / "recipe.yaml"
DATA_PREFIX = "data/paper/"
NODES, GPUS_PER_NODE = 8, 8
# Qwen2.5-1.5B's public config.json (the fields our LLMConfig reads; tests/test_hf_convert.py uses the same).
QWEN25_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
EXPECTED = {  # step -> (kind, lr)
    "stage1_align": ("align", 4e-5),
    "stage2_ett": ("ett", 4e-5),
    "stage3a_chat": ("chat_sft", 2e-5),
    "stage3b_t2i": ("t2i", 2e-5),
}


def _redirect(value, root: Path):
    """Data paths (data/paper/...) -> under `root`; every other value unchanged."""
    if isinstance(value, dict):
        return {k: _redirect(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_redirect(v, root) for v in value]
    if isinstance(value, str) and value.startswith(DATA_PREFIX):
        return str(root / value)
    return value


def _paths(stage: dict) -> list[str]:
    """Every input path a resolved stage config names: datasets, text tokenizer, starting weights, LPIPS file."""
    paths = [d["path"] for d in stage["data"]["train"]] + [stage["data"]["text_tokenizer"]]
    paths += [
        stage["stage"][k]
        for k in ("init_from", "init_llm_from", "init_tokenizer_from")
        if stage["stage"].get(k)
    ]
    return paths


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, TrainConfig]:
    """name -> the TrainConfig that training.pipeline would run for that step, in a temporary output directory."""
    tmp = tmp_path_factory.mktemp("paper")
    recipe = pipeline.load_recipe(RECIPE)
    output_dir = tmp / "runs"
    defaults = _redirect(recipe["defaults"], tmp)
    steps = [s for s in recipe["steps"] if s["run"] == "train"]
    out = {}
    for step in steps:
        step = {**step, "config": _redirect(step["config"], tmp)}
        merged = pipeline.resolve_refs(pipeline.deep_merge(defaults, step["config"]), output_dir)
        for path in _paths(merged):  # the datasets, parts and previous hand-offs the stage reads
            Path(path).mkdir(parents=True, exist_ok=True)
        step_dir = output_dir / step["name"]
        step_dir.mkdir(parents=True, exist_ok=True)
        # The pipeline's own step builder: merges over defaults, resolves "@NAME" and {output_dir}, writes
        # STEP/stage.yaml and loads it as a TrainConfig (TrainConfig.validate included).
        command = pipeline.step_command(step, step_dir, output_dir, defaults, 1, [], "auto")
        assert command[1:3] == ["-m", "training.train"]
        out[step["name"]] = load_config(TrainConfig, step_dir / "stage.yaml")
    return out


def test_recipe_steps_and_hand_offs(stages):
    recipe = pipeline.load_recipe(RECIPE)
    assert [s["name"] for s in recipe["steps"]] == list(EXPECTED)
    assert all(s["run"] == "train" for s in recipe["steps"])
    assert set(stages) == set(EXPECTED)
    for name, (kind, lr) in EXPECTED.items():
        cfg = stages[name]
        assert cfg.stage.kind == kind, name
        assert cfg.optim.lr == pytest.approx(lr), name
        assert cfg.optim.param_groups == [], name  # one learning rate per stage, as the paper gives
    s1, s2, s3a, s3b = (stages[n] for n in EXPECTED)
    assert s1.stage.init_llm_from.endswith("parts/llm")
    assert s1.stage.init_tokenizer_from.endswith("parts/ibq_tokenizer")
    assert Path(s2.stage.init_from) == Path(s1.train.output_dir) / "final"
    assert Path(s3a.stage.init_from) == Path(s3b.stage.init_from) == Path(s2.train.output_dir) / "final"
    assert pipeline.step_dependencies(recipe["steps"][3]) == {"stage2_ett"}


def test_missing_hand_off_is_named(tmp_path):
    """The validation is real: stage 2 without stage 1's hand-off is refused, naming stage.init_from."""
    recipe = pipeline.load_recipe(RECIPE)
    step = next(s for s in recipe["steps"] if s["name"] == "stage2_ett")
    step = {**step, "config": _redirect(step["config"], tmp_path)}
    defaults = _redirect(recipe["defaults"], tmp_path)
    merged = pipeline.resolve_refs(pipeline.deep_merge(defaults, step["config"]), tmp_path / "runs")
    for path in _paths(merged):  # everything but the hand-off exists
        if path != merged["stage"]["init_from"]:
            Path(path).mkdir(parents=True, exist_ok=True)
    step_dir = tmp_path / "runs" / "stage2_ett"
    step_dir.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"stage\.init_from=.*stage1_align/final does not exist"):
        pipeline.step_command(
            step, step_dir, tmp_path / "runs", _redirect(recipe["defaults"], tmp_path), 1, [], "auto"
        )


def test_trainable_sets_and_alpha(stages):
    s1, s2, s3a, s3b = (stages[n] for n in EXPECTED)
    trainable = {name: STAGES[cfg.stage.kind].trainable_prefixes(cfg.stage) for name, cfg in stages.items()}
    assert "llm." not in trainable["stage1_align"] and "tokenizer." not in trainable["stage1_align"]
    assert "projector." in trainable["stage1_align"]
    assert {"tokenizer.", "projector.", "llm."} <= set(trainable["stage2_ett"])
    for name in ("stage3a_chat", "stage3b_t2i"):
        assert {"projector.", "llm."} <= set(trainable[name]) and "tokenizer." not in trainable[name]
    assert s2.stage.alpha == 0.25 and s2.stage.train_tokenizer and s2.stage.train_discriminator
    assert STAGES["ett"].vq_loss_weight(s2.stage) == 0.25
    assert s3b.model.ett.visual_head is True and "visual_head." in trainable["stage3b_t2i"]
    assert not any(cfg.model.ett.visual_head for cfg in (s1, s2, s3a))
    assert all(cfg.model.ett.visual_input == "embedding" for cfg in stages.values())
    loss = s2.model.tokenizer.loss
    assert (loss.l1_weight, loss.perceptual_weight, loss.gan_weight, loss.entropy_weight) == (
        1.0,
        1.0,
        0.1,
        0.05,
    )


def test_shared_settings_and_zero3(stages):
    for name, cfg in stages.items():
        assert cfg.train.global_batch_size == 1024, name
        assert (cfg.schedule.warmup_ratio, cfg.schedule.kind) == (0.03, "cosine"), name
        assert cfg.train.precision == "bf16", name
        assert cfg.deepspeed.zero_stage == 3, name
        assert (
            json.loads(resolve_ds_config_path(cfg.deepspeed.config).read_text())["zero_optimization"]["stage"]
            == 3
        )
        # The global batch divides over 8 nodes x 8 GPUs at the chosen micro batch: the DeepSpeed config that
        # a 64-rank run would build.
        world = NODES * GPUS_PER_NODE
        assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * world) == 0, name
        ds = build_ds_config(cfg, world)
        assert (
            ds["train_batch_size"] == 1024
            and ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
        )
        assert ds["gradient_accumulation_steps"] * cfg.train.micro_batch_size * world == 1024
        assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
        assert ds["gradient_clipping"] == cfg.optim.grad_clip


def test_paper_shapes(stages):
    for name, cfg in stages.items():
        tok, llm = cfg.model.tokenizer, cfg.model.llm
        assert tuple(cfg.data.image_size) == (512, 512), name
        assert tok.downsample_factor == 16
        assert (cfg.data.image_size[0] // 16) * (cfg.data.image_size[1] // 16) == 1024
        assert (tok.codebook_size, tok.code_dim, tok.quantizer) == (131072, 256, "ibq")
        assert cfg.data.seq_len >= 1024 + 32 + 2  # one image span (codes, row ends, markers) fits a row
        qwen = LLMConfig(
            vocab_size=QWEN25_15B["vocab_size"],
            hidden_size=QWEN25_15B["hidden_size"],
            num_layers=QWEN25_15B["num_hidden_layers"],
            num_heads=QWEN25_15B["num_attention_heads"],
            num_kv_heads=QWEN25_15B["num_key_value_heads"],
            intermediate_size=QWEN25_15B["intermediate_size"],
            rope_theta=QWEN25_15B["rope_theta"],
            rms_norm_eps=QWEN25_15B["rms_norm_eps"],
            max_position_embeddings=QWEN25_15B["max_position_embeddings"],
            qkv_bias=True,
            tie_embeddings=QWEN25_15B["tie_word_embeddings"],
        )
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "rope_theta", "rms_norm_eps", "max_position_embeddings", "qkv_bias", "tie_embeddings"):  # fmt: skip
            assert getattr(llm, field) == getattr(qwen, field), (name, field)


def test_every_unstated_value_is_marked():
    """Every line of the recipe that sets a value carries a `paper:` or `choice:` comment, or sits in a block whose
    comment marks it (the model shapes, the loss weights), so nothing is silently picked."""
    text = RECIPE.read_text()
    assert "choice:" in text and "paper:" in text
    for key in ("seq_len", "micro_batch_size", "max_steps", "min_lr_ratio", "weight_decay", "betas", "grad_clip",
                "save_every", "num_workers", "caption_dropout", "precision", "config: ds_configs"):  # fmt: skip
        lines = [line for line in text.splitlines() if f"{key}" in line and not line.lstrip().startswith("#")]
        assert lines, key
        for line in lines:
            assert "choice:" in line or "paper:" in line, line
    yaml.safe_load(text)  # plain YAML too


def test_sbatch_runs_this_recipe_on_8x8():
    sbatch = (RECIPE.parents[3] / "launch" / "slurm" / "paper.sbatch").read_text()
    assert "#SBATCH --nodes=8" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert "training/recipes/paper/recipe.yaml" in sbatch and "training.pipeline" in sbatch
    assert "launch/slurm/common.sh" in sbatch
