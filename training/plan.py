"""Plan a stage or a recipe before running it: sizes, memory per GPU, data per step, and the step-1 checks.

    python -m training.plan --config STAGE_OR_RECIPE.yaml [--nodes N] [--gpus-per-node G] [--target gpu|cpu]
                            [--json FILE] [section.key=value ...]

A stage YAML (training/run_config.py) plans that stage; a recipe YAML (training/pipeline.py) plans each `train`
step, resolved as the recipe runner resolves it (`train_step_config`), with paths that earlier steps create
reported as "produced by step X" rather than as errors. Nothing is trained and no weights exist: the model is
built on the meta device (training.stages.build_model under torch.device("meta")), so the paper's shapes plan in
seconds on a laptop. Exit codes: 0 fine, 2 a configuration error or a problem that would fail at step 1
(training/run_config.py `check_stage`, which `python -m training.train` runs too).

What it reports, per stage (all memory per GPU, world size W = nodes x gpus per node, p = bytes per parameter of
the compute dtype: 2 in bf16, 4 in fp32; train.precision=auto is bf16 on --target gpu, fp32 on --target cpu):

* parameters per component (llm, tokenizer, projector / index_embedding, visual_head) and the trainable ones
  (the StageSpec's trainable prefixes, training/stages.py);
* model states under ZeRO-3 without offload, two ways:
  - DeepSpeed's own estimator, `estimate_zero3_model_states_mem_needs` (the function behind
    `estimate_zero3_model_states_mem_needs_all_cold`): 4 x largest layer + 18 bytes x all parameters / W. It
    treats every parameter as trainable and ignores the reduce bucket;
  - this planner's breakdown, used for the total: parameters p x (partitioned / W + persistent), where persistent
    ones are those under deepspeed.param_persistence_threshold elements (ZeRO-3 keeps them whole on every rank);
    gradients p x trainable / W (DeepSpeed's flat gradient partition, in the parameter dtype); fp32 master copy
    4 x trainable / W (none in fp32 training: DeepSpeed then updates the parameters' own partition); Adam's two
    fp32 moments 8 x trainable / W; the largest module gathered whole while it runs, p x its parameters; the
    gradient reduce bucket, p x deepspeed.reduce_bucket_size elements (allocated whole by DeepSpeed);
* activations at train.micro_batch_size (what autograd keeps for backward; see `llm_activation_bytes` and
  `tokenizer_activation_bytes` for the per-token and per-image counts and where they come from), the head's
  loss (with model.ett.fused_head_loss, the default: the largest logit tile of the fused linear cross-entropy,
  within its memory budget and at most the whole [N, V]; without:
  the N x V logits of the LM head or the M x K logits of the visual head in t2i), and a note that the K-way codebook
  logits are never materialised (modeling/kernels computes them in chunks);
* tokens per sample (mean over the first rows of every data.train dataset, laid out by data_pipeline/layouts.py:
  each image is an h*(w+1)+2-token span), samples per packed row and per step, and steps per epoch from the
  manifests' row counts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from training.config import ConfigError, apply_overrides, from_dict
from training.run_config import Producer, TrainConfig, stage_problems
from training.stages import STAGES

COMPONENTS = ("llm", "tokenizer", "projector", "index_embedding", "visual_head")
SAMPLE_ROWS = 64  # rows read per dataset for the tokens-per-sample mean
GIB = 2**30


@dataclass
class StagePlan:
    name: str
    kind: str
    report: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- parameters ----------------------------------------------------------------------------------------------
def meta_model(cfg: TrainConfig):
    """The stage's model on the meta device: shapes and the trainable set, no memory, no initialisation cost."""
    from training.stages import build_model

    with torch.device("meta"):
        return build_model(cfg)


def parameter_counts(model) -> dict:
    """{component: {"total", "trainable"}}, the totals, the largest module's own parameters and the parameters under
    ZeRO-3's persistence threshold (filled in by the caller). Shared (tied) parameters count once."""
    counts = {name: {"total": 0, "trainable": 0} for name in COMPONENTS if hasattr(model, name)}
    for name, param in model.named_parameters():
        part = counts.setdefault(name.split(".", 1)[0], {"total": 0, "trainable": 0})
        part["total"] += param.numel()
        if param.requires_grad:
            part["trainable"] += param.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {
        "components": counts,
        "total": sum(c["total"] for c in counts.values()),
        "trainable": sum(c["trainable"] for c in counts.values()),
        "largest_module": largest,
    }


# ---- memory --------------------------------------------------------------------------------------------------
def compute_bytes(cfg: TrainConfig, target: str) -> int:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if target == "gpu" else "fp32"
    return 2 if precision == "bf16" else 4


def model_state_bytes(model, cfg: TrainConfig, counts: dict, world: int, nodes: int, p: int) -> dict:
    """Per-GPU model states under ZeRO-3 (no offload): DeepSpeed's estimator and this planner's breakdown."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    threshold = cfg.deepspeed.param_persistence_threshold
    persistent = sum(q.numel() for q in model.parameters() if q.numel() < threshold)
    total, trainable = counts["total"], counts["trainable"]
    _, deepspeed_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, counts["largest_module"], num_gpus_per_node=world // nodes, num_nodes=nodes, cpu_offload=False
    )
    bucket = cfg.deepspeed.reduce_bucket_size
    parts = {
        "parameters": p * ((total - persistent) / world + persistent),
        "gradients": p * trainable / world,
        "fp32_master": (4 * trainable / world) if p != 4 else 0.0,
        "adam_moments": 8 * trainable / world,
        "gathered_largest_module": p * counts["largest_module"],
        "reduce_bucket": p * bucket,
    }
    return {
        "formula": "p*(partitioned/W + persistent) + p*T/W + (4 if p != 4)*T/W + 8*T/W + p*largest + p*bucket",
        "bytes_per_param": p,
        "persistent_parameters": persistent,
        "parts": {k: int(v) for k, v in parts.items()},
        "total": int(sum(parts.values())),
        "deepspeed_estimator": int(deepspeed_gpu),
        "deepspeed_estimator_formula": "4*largest + 18*all_params/W (estimate_zero3_model_states_mem_needs)",
    }


def fused_head_loss_bytes(rows: int, classes: int, hidden: int, p: int) -> int:
    """The fused linear cross-entropy's temporaries: one logit tile of the torch path (tile sizes from
    modeling/kernels/reference.py, BYTES_PER_LOGIT per logit) plus, for a half-precision weight, the fp32 copy of
    its weight tile. A tile never exceeds [rows, classes], so a small head costs less than the budget."""
    from modeling.kernels.reference import BYTES_PER_LOGIT, linear_ce_tile_sizes

    tile_rows, tile_classes = linear_ce_tile_sizes(rows, classes, hidden, upcast_weight=p != 4)
    weight_copy = tile_classes * hidden * 4 if p != 4 else 0
    return tile_rows * tile_classes * BYTES_PER_LOGIT + weight_copy


def llm_activation_bytes(llm, tokens: int, p: int) -> dict:
    """What autograd keeps for backward in the LLM for `tokens` tokens (micro_batch_size x seq_len), counted from
    modeling/llm/model.py and attention.py (flash-style attention, no S x S matrix; checked against a
    saved-tensor trace of a real layer). Per token per layer, in elements: the layer input and the attention-norm
    output (2h), the fused QKV output (h + 2 kv d), the rotated q and k (h + kv d), the attention output and its
    reshaped copy (2h), the log-sum-exp (heads), the residual sum and the MLP-norm output (2h), fc1's [gate; up]
    (2I), silu(gate) (I) and the product (I): 8h + 3 kv d + 4I + heads. Plus 3h per token outside the layers (the
    embedding output and the final norm's input and output). With activation checkpointing a layer keeps only its
    input (h) and one layer is recomputed at a time."""
    h, inter, heads = llm.hidden_size, llm.intermediate_size, llm.num_heads
    kv_dim = llm.num_kv_heads * llm.head_dim
    per_layer = 8 * h + 3 * kv_dim + 4 * inter + heads
    if llm.activation_checkpointing:
        elements = tokens * (llm.num_layers * h + per_layer + 3 * h)
    else:
        elements = tokens * (llm.num_layers * per_layer + 3 * h)
    return {
        "per_token_per_layer_elements": per_layer,
        "tokens": tokens,
        "bytes": int(elements * p),
    }


def logits_bytes(rows: int, classes: int, p: int) -> int:
    """rows x classes logits in the compute dtype (p), their fp32 copy for the loss (none when p is 4), the
    log-softmax output cross-entropy keeps (fp32) and its gradient (fp32)."""
    return int(rows * classes * (p + (4 if p != 4 else 0) + 4 + 4))


def tokenizer_activation_bytes(tok, height: int, width: int, p: int, decode: bool) -> dict:
    """What autograd keeps per image in the VQ tokenizer (modeling/tokenizer/encoder_decoder.py), per pixel of each
    level: a ResNet block with c_in -> c_out channels keeps its input, norm1 output and swish output (3 c_in) and the
    same after conv1 (3 c_out); an attention block its input, norm output, qkv (3c), the attention output and its
    reshaped copy (7c in all); a downsample its padded input (c); an upsample its nearest-neighbour output (c at the
    next level's size); conv_in and the closing norm/swish/conv_out 1 and 3 channels' worth. The encoder has
    num_res_blocks blocks per level, the decoder num_res_blocks + 1; `decode` adds the decoder (L_vq)."""
    mult, base = tok.channel_mult, tok.base_channels
    levels = len(mult)
    widths = [base * m for m in mult]

    def pixels(level: int) -> int:
        return (height >> level) * (width >> level)

    elements = base * pixels(0)  # conv_in output
    res, c_in = tok.resolution, base
    for i, c_out in enumerate(widths):
        for _ in range(tok.num_res_blocks):
            elements += (3 * c_in + 3 * c_out) * pixels(i)
            if res in tok.attn_resolutions:
                elements += 7 * c_out * pixels(i)
            c_in = c_out
        if i < levels - 1:
            elements += c_out * pixels(i)
            res //= 2
    last = levels - 1
    elements += (2 * 6 * widths[-1] + 7 * widths[-1] + 3 * widths[-1]) * pixels(
        last
    )  # mid + norm_out/conv_out
    encoder = elements
    if decode:
        elements = widths[-1] * pixels(last)  # decoder conv_in output
        elements += (2 * 6 * widths[-1] + 7 * widths[-1]) * pixels(last)
        res, c_in = tok.resolution // tok.downsample_factor, widths[-1]
        for i in reversed(range(levels)):
            c_out = widths[i]
            for _ in range(tok.num_res_blocks + 1):
                elements += (3 * c_in + 3 * c_out) * pixels(i)
                if res in tok.attn_resolutions:
                    elements += 7 * c_out * pixels(i)
                c_in = c_out
            if i > 0:
                elements += c_out * pixels(i - 1)
                res *= 2
        elements += 3 * base * pixels(0)
        decoder = elements
    else:
        decoder = 0
    return {"encoder_bytes_per_image": int(encoder * p), "decoder_bytes_per_image": int(decoder * p)}


# ---- data ----------------------------------------------------------------------------------------------------
def dataset_stats(cfg: TrainConfig, path: str) -> dict | None:
    """Rows and tasks from the manifest; mean tokens and images per sample over its first SAMPLE_ROWS rows, laid
    out as training lays them out (data_pipeline/layouts.py), images not decoded. None when it does not exist."""
    from data_pipeline.layouts import SequenceBuilder, image_grid
    from data_pipeline.shards import ShardDataset
    from data_pipeline.text_tokenizer import TextTokenizer

    if not Path(path).is_dir() or not cfg.data.text_tokenizer or not Path(cfg.data.text_tokenizer).exists():
        return None
    dataset = ShardDataset(path)
    tok = TextTokenizer.load(cfg.data.text_tokenizer)
    grid = image_grid(tuple(cfg.data.image_size), cfg.model.tokenizer.downsample_factor)
    tokens = images = rows = 0
    for shard, shard_rows in enumerate(dataset.shard_rows):
        for index in range(min(shard_rows, SAMPLE_ROWS - rows)):
            sample = dataset.row(shard, index)
            builder = SequenceBuilder(tok, grid, sample["task"])
            for seg in sample["segments"]:
                if seg["image"] is not None:
                    builder.image(seg.get("role"))
                    images += 1
                elif seg["text"]:
                    builder.text(seg["text"], seg.get("role"))
            tokens += len(builder.finish().input_ids)
            rows += 1
        if rows >= SAMPLE_ROWS:
            break
    return {
        "path": path,
        "num_samples": dataset.num_samples,
        "tasks": dataset.manifest.get("tasks", {}),
        "sampled_rows": rows,
        "tokens_per_sample": tokens / max(rows, 1),
        "images_per_sample": images / max(rows, 1),
    }


def data_report(cfg: TrainConfig, world: int) -> dict:
    """Per dataset and mixed (weighted by data.train weights): tokens per sample, samples per packed row (greedy
    packing into seq_len rows, data_pipeline/packing.py; an overlong sample is truncated to one row), samples and
    images per micro-batch and per step, steps per epoch (rows of the mixture / samples per step)."""
    from data_pipeline.layouts import image_grid

    grid = image_grid(tuple(cfg.data.image_size), cfg.model.tokenizer.downsample_factor)
    span = grid[0] * (grid[1] + 1) + 2
    report = {
        "image_grid": list(grid),
        "codes_per_image": grid[0] * grid[1],
        "image_span_tokens": span,
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "world_size": world,
        "gradient_accumulation_steps": cfg.train.global_batch_size
        // max(1, cfg.train.micro_batch_size * world),
        "datasets": [],
    }
    stats = [dataset_stats(cfg, d.path) for d in cfg.data.train]
    known = [(s, d.weight) for s, d in zip(stats, cfg.data.train) if s is not None]
    report["datasets"] = [s for s in stats if s is not None]
    if not known:
        return report
    weight = sum(w for _, w in known)
    tokens = sum(s["tokens_per_sample"] * w for s, w in known) / weight
    images = sum(s["images_per_sample"] * w for s, w in known) / weight
    per_row = max(1, cfg.data.seq_len // max(1, math.ceil(tokens)))
    per_step = per_row * cfg.train.global_batch_size
    total = sum(s["num_samples"] for s, _ in known)
    report.update(
        tokens_per_sample=round(tokens, 1),
        images_per_sample=round(images, 2),
        overlong=tokens > cfg.data.seq_len,
        samples_per_row=per_row,
        samples_per_micro_batch=per_row * cfg.train.micro_batch_size,
        images_per_micro_batch=math.ceil(images * per_row * cfg.train.micro_batch_size),
        samples_per_step=per_step,
        tokens_per_step=cfg.data.seq_len * cfg.train.global_batch_size,
        epoch_samples=total,
        steps_per_epoch=round(total / per_step, 1),
        epochs_in_schedule=round(cfg.schedule.max_steps * per_step / total, 2),
    )
    return report


def images_per_micro_batch(cfg: TrainConfig, data: dict) -> int:
    """From the data report; without data, one image per packed row."""
    if "images_per_micro_batch" in data:
        return data["images_per_micro_batch"]
    return cfg.train.micro_batch_size


# ---- one stage -----------------------------------------------------------------------------------------------
def plan_stage(
    cfg: TrainConfig, nodes: int, gpus_per_node: int, target: str, produced: dict[str, Producer] | None = None
) -> StagePlan:
    spec = STAGES[cfg.stage.kind]
    world = nodes * gpus_per_node
    plan = StagePlan(cfg.stage.name, cfg.stage.kind)
    problems, plan.notes = stage_problems(cfg, world, produced)
    plan.problems = [str(p) for p in problems]
    model = meta_model(cfg)
    counts = parameter_counts(model)
    p = compute_bytes(cfg, target)
    states = model_state_bytes(model, cfg, counts, world, nodes, p)
    if cfg.deepspeed.zero_stage is not None and cfg.deepspeed.zero_stage != 3:
        plan.notes.append(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: model states are planned as under ZeRO-3 (the "
            "default ds_configs/zero3.json)"
        )
    data = data_report(cfg, world)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    activations: dict = {}
    trains_tokenizer = spec.trains_tokenizer(cfg.stage)
    if spec.with_llm:
        activations["llm"] = llm_activation_bytes(cfg.model.llm, tokens, p)
        if cfg.model.ett.visual_head and spec.kind == "t2i":
            head = "visual_head"
            rows, classes = (
                images_per_micro_batch(cfg, data) * data["codes_per_image"],
                cfg.model.tokenizer.codebook_size,
            )
        else:
            head, rows, classes = "lm_head", tokens, cfg.model.llm.vocab_size
        if cfg.model.ett.fused_head_loss:
            activations[f"{head}_loss"] = {
                "shape": [rows, classes],
                "bytes": fused_head_loss_bytes(rows, classes, cfg.model.llm.hidden_size, p),
                "note": "fused linear cross-entropy: the temporaries of its largest logit tile (within the "
                "kernel's memory budget, and never more than the whole [rows, classes]; modeling/kernels), the "
                "logits are never materialised",
            }
        else:
            activations[f"{head}_logits"] = {
                "shape": [rows, classes],
                "bytes": logits_bytes(rows, classes, p),
            }
    if spec.with_tokenizer and trains_tokenizer:
        height, width = cfg.data.image_size
        per_image = tokenizer_activation_bytes(
            cfg.model.tokenizer, height, width, p, decode=spec.vq_loss_weight(cfg.stage) > 0
        )
        images = images_per_micro_batch(cfg, data) if spec.with_llm else cfg.train.micro_batch_size
        activations["tokenizer"] = {
            **per_image,
            "images": images,
            "bytes": images * (per_image["encoder_bytes_per_image"] + per_image["decoder_bytes_per_image"]),
        }
    if spec.with_tokenizer:
        activations["codebook_logits"] = (
            f"N x K = {data['codes_per_image']} codes per image x {cfg.model.tokenizer.codebook_size}: not "
            "materialised (modeling/kernels: chunked)"
        )
    activation_total = sum(v["bytes"] for v in activations.values() if isinstance(v, dict))
    plan.report = {
        "stage": cfg.stage.name,
        "kind": cfg.stage.kind,
        "world_size": world,
        "target": target,
        "parameters": counts,
        "trainable_prefixes": list(spec.trainable_prefixes(cfg.stage)),
        "model_states": states,
        "activations": {**activations, "total": int(activation_total)},
        "memory_per_gpu": int(states["total"] + activation_total),
        "data": data,
        "notes": plan.notes,
        "problems": plan.problems,
    }
    return plan


# ---- configs and recipes ---------------------------------------------------------------------------------------
def stage_config(data: dict, overrides, check_paths: bool = True) -> TrainConfig:
    """A TrainConfig from a stage dict; `check_paths=False` leaves the stage.init_* directories to check_stage
    (a recipe's later stages start from directories that earlier steps create)."""
    from typing import get_type_hints

    data = apply_overrides(TrainConfig, dict(data), list(overrides))
    hints = get_type_hints(TrainConfig)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; expected some of {sorted(hints)}")
    cfg = TrainConfig(**{name: from_dict(hints[name], value, name) for name, value in data.items()})
    cfg.validate(check_paths=check_paths)
    return cfg


def plan_config(path: str, nodes: int, gpus_per_node: int, target: str, overrides=()) -> list[StagePlan]:
    """Plan a stage YAML, or every `train` step of a recipe YAML."""
    from training.config import load_config
    from training.pipeline import load_recipe, recipe_output_dir, resolve_refs, train_step_config

    text = Path(path).read_text() if Path(path).is_file() else None
    if text is None:
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(text) or {}
    if not (isinstance(raw, dict) and "steps" in raw):
        cfg = load_config(TrainConfig, path, list(overrides))
        return [plan_stage(cfg, nodes, gpus_per_node, target)]
    recipe = load_recipe(path)
    output_dir = recipe_output_dir(recipe, path)
    defaults = recipe.get("defaults", {})
    produced: dict[str, Producer] = {}
    plans = []
    for step in recipe.get("steps", []):
        name = step["name"]
        step_dir = output_dir / name
        if step["run"] == "train":
            data = train_step_config(step, step_dir, output_dir, defaults)
            try:
                cfg = stage_config(data, overrides, check_paths=False)
            except ConfigError as exc:
                raise ConfigError(f"step {name!r}: {exc}") from None
            plans.append(plan_stage(cfg, nodes, gpus_per_node, target, produced))
            spec = STAGES[cfg.stage.kind]
            parts = (("llm", spec.with_llm), ("vision_tokenizer", spec.with_tokenizer))
            produced[str(step_dir)] = Producer(name, tuple(c for c, present in parts if present))
        else:
            # A python or command step may write anywhere its arguments name (the demo's data step: --out DIR).
            produced[str(step_dir)] = Producer(name)
            arguments = step.get("args", {}) if step["run"] == "python" else step.get("command", [])
            for value in _strings(resolve_refs(arguments, output_dir)):
                if "/" in value and not Path(value).exists():
                    produced[value] = Producer(name)
    return plans


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


# ---- output ---------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def format_plan(plan: StagePlan) -> str:
    r = plan.report
    lines = [f"== {r['stage']} (stage.kind={r['kind']}), world size {r['world_size']}, target {r['target']}"]
    params = r["parameters"]
    lines.append(f"parameters: {_count(params['total'])} in all, {_count(params['trainable'])} trainable")
    for name, c in params["components"].items():
        lines.append(f"  {name:16s} {_count(c['total']):>12s}   trainable {_count(c['trainable']):>12s}")
    lines.append(f"  trainable prefixes: {', '.join(r['trainable_prefixes'])}")
    states = r["model_states"]
    lines.append(
        f"model states per GPU (ZeRO-3, {states['bytes_per_param']}-byte params): {_gib(states['total'])}"
    )
    for name, value in states["parts"].items():
        lines.append(f"  {name:24s} {_gib(value)}")
    lines.append(
        f"  DeepSpeed's estimator ({states['deepspeed_estimator_formula']}): {_gib(states['deepspeed_estimator'])}"
    )
    acts = r["activations"]
    lines.append(f"activations per GPU at micro batch {r['data']['micro_batch_size']}: {_gib(acts['total'])}")
    for name, value in acts.items():
        if name == "total":
            continue
        if isinstance(value, dict):
            extra = ""
            if "per_token_per_layer_elements" in value:
                extra = f" ({value['tokens']} tokens, {value['per_token_per_layer_elements']} elements/token/layer)"
            elif "images" in value:
                per = value["encoder_bytes_per_image"] + value["decoder_bytes_per_image"]
                extra = f" ({value['images']} images x {_gib(per)})"
            elif "shape" in value:
                extra = f" ({value['shape'][0]} x {value['shape'][1]})"
            lines.append(f"  {name:24s} {_gib(value['bytes'])}{extra}")
        else:
            lines.append(f"  {name:24s} {value}")
    lines.append(f"memory per GPU (model states + activations): {_gib(r['memory_per_gpu'])}")
    data = r["data"]
    lines.append(
        f"data: image grid {data['image_grid'][0]}x{data['image_grid'][1]} ({data['codes_per_image']} codes, a "
        f"{data['image_span_tokens']}-token span), seq_len {data['seq_len']}, global batch "
        f"{data['global_batch_size']} rows = {data['micro_batch_size']} x {data['world_size']} GPUs x "
        f"{data['gradient_accumulation_steps']} accumulation steps"
    )
    for d in data["datasets"]:
        lines.append(
            f"  {d['path']}: {d['num_samples']:,} samples {d['tasks']}, {d['tokens_per_sample']:.1f} tokens and "
            f"{d['images_per_sample']:.2f} images per sample"
        )
    if "samples_per_step" in data:
        lines.append(
            f"  {data['tokens_per_sample']} tokens per sample{' (over seq_len: truncated)' if data['overlong'] else ''}"
            f", {data['samples_per_row']} samples per row, {data['samples_per_step']:,} samples per step, "
            f"{data['steps_per_epoch']:,} steps per epoch ({data['epochs_in_schedule']} epochs in "
            f"schedule.max_steps)"
        )
    for note in plan.notes:
        lines.append(f"  note: {note}")
    for problem in plan.problems:
        lines.append(f"  ERROR {problem}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.plan",
        description="Plan a stage or recipe: parameters, ZeRO-3 memory per GPU, data per step, step-1 checks. "
        "Builds the model on the meta device; nothing is trained.",
        epilog="exit codes: 0 fine, 2 configuration error or a problem that would fail at step 1",
    )
    parser.add_argument(
        "--config", required=True, help="stage YAML or recipe YAML (training.pipeline format)"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument(
        "--target", choices=("gpu", "cpu"), default="gpu", help="where the run will be (train.precision=auto)"
    )
    parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides (section.key=value), every stage")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        print("configuration error: --nodes and --gpus-per-node must be >= 1", file=sys.stderr)
        return 2
    try:
        plans = plan_config(args.config, args.nodes, args.gpus_per_node, args.target, args.overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    for plan in plans:
        print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps([p.report for p in plans], indent=1) + "\n")
    failed = [p for p in plans if p.problems]
    for plan in failed:
        for problem in plan.problems:
            print(f"error: {plan.name}: {problem}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
