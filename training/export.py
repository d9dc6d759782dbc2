"""Hugging Face export from ZeRO-3 checkpoints; the same layout is the stage hand-off format.

    python -m training.export --checkpoint RUN/checkpoints [--tag step00000100] --out EXPORT [--dtype bf16|fp32]
                              [--max-shard-size 5GB] [--text-tokenizer DIR]

EXPORT/
  ett_config.json      ties the parts together: components, provenance (stage, step, samples seen, source
                       checkpoint) and the full run config
  llm/                 a transformers model directory (config.json, model.safetensors or model-0000i-of-0000n.safetensors
                       + model.safetensors.index.json, generation_config.json, the text tokenizer files):
                       AutoModelForCausalLM / AutoTokenizer load it with no custom code
  vision_tokenizer/    VQTokenizer.save_pretrained layout (model.safetensors + tokenizer_config.json)
  projector/ visual_head/ index_embedding/ discriminator/
                       model.safetensors + config.json, where the model has them
  config.json, *.safetensors, *.py, processor files
                       the whole model for transformers (AutoModelForImageTextToText + AutoProcessor with
                       trust_remote_code=True), when the export has the LLM, the vision tokenizer and a text
                       tokenizer: training/hf_model/__init__.py lists the files, docs/hf_export.md the calls

Memory: DeepSpeed's lazy consolidation (`get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`) maps the fp32
partitions of every rank's optimizer file (torch.load mmap, Adam moments dropped) and gathers one tensor at a time.
The LLM is converted tensor by tensor and each safetensors shard is written as soon as it is full
(`training.hf_convert.write_hf_llm`), so the process holds at most the mapped fp32 partitions (one full-precision
copy of the model) plus one shard. The export is written to a temporary directory next to `--out` and renamed into
place: a failed export leaves nothing behind, and an existing export at `--out` stays as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import get_type_hints

import torch
from safetensors.torch import load_file, save_file

EXPORT_CONFIG = "ett_config.json"
SIMPLE_COMPONENTS = ("projector", "visual_head", "index_embedding")


class ExportError(RuntimeError):
    """The checkpoint or export directory is unusable; the message names what is missing."""


def run_config_from_dict(data: dict):
    """The run config saved in a checkpoint or export -> TrainConfig, section by section and without
    `TrainConfig.validate`, which checks paths (datasets, previous stages) of the machine that trained."""
    from modeling.llm import LLMConfig
    from training.config import ConfigError, from_dict
    from training.run_config import TrainConfig

    hints = get_type_hints(TrainConfig)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ExportError(f"run config has unknown sections {unknown}; expected some of {sorted(hints)}")
    try:
        if isinstance(data.get("model"), dict) and isinstance(data["model"].get("llm"), dict):
            llm = LLMConfig.without_removed_defaults(data["model"]["llm"], "run config model.llm")
            data = {**data, "model": {**data["model"], "llm": llm}}
        return TrainConfig(**{name: from_dict(hints[name], value, name) for name, value in data.items()})
    except (ConfigError, ValueError) as exc:
        raise ExportError(f"run config saved with the weights is invalid: {exc}") from None


def _split(state: dict) -> dict[str, dict]:
    parts: dict[str, dict] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        parts.setdefault(head, {})[rest] = value
    return parts


def _materialize(tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor or one of DeepSpeed's lazy GatheredTensors -> a CPU tensor that owns its memory (safetensors refuses
    tensors that share storage), cast to `dtype` if given."""
    tensor = tensor.contiguous().detach().cpu()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.clone()


def _save_simple(out: Path, name: str, tensors: dict, config: dict, dtype: torch.dtype | None) -> None:
    out.mkdir(parents=True)
    save_file(
        {k: _materialize(v, dtype) for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps({"component": name, **config}, indent=1))


def _load_text_tokenizer(path: str | None):
    if not path:
        return None
    from data_pipeline.text_tokenizer import TextTokenizer

    if not Path(path).exists():
        raise ExportError(
            f"text tokenizer {path} (data.text_tokenizer of the run) does not exist here; pass --text-tokenizer DIR"
        )
    return TextTokenizer.load(path)


def _prepare_out_dir(out_dir: Path) -> Path:
    """A fresh temporary directory next to `out_dir` (same filesystem, so the final rename is atomic)."""
    if out_dir.exists() and not (out_dir / EXPORT_CONFIG).is_file() and any(out_dir.iterdir()):
        raise ExportError(
            f"--out {out_dir} exists and is not an ETT export (no {EXPORT_CONFIG}); refusing to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_export(
    state: dict,
    cfg,
    out_dir: str | Path,
    provenance: dict,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    discriminator_state: dict[str, torch.Tensor] | None = None,
    text_tokenizer: str | None = None,
) -> Path:
    """Write the export layout from a full ETTModel state dict (keys 'llm.*', 'tokenizer.*', 'projector.*', ...;
    values are tensors or DeepSpeed's lazy GatheredTensors). `dtype` casts the LLM, projector, visual head and index
    embedding (the vision tokenizer and discriminator stay fp32). `text_tokenizer` overrides cfg.data.text_tokenizer."""
    from modeling.tokenizer import VQTokenizer
    from training.config import to_dict
    from training.hf_convert import write_hf_llm
    from training.hf_model import write_hf_model

    out_dir = Path(out_dir)
    tmp = _prepare_out_dir(out_dir)
    try:
        parts = _split(state)
        components, tokenizer = [], None
        if "llm" in parts:
            tokenizer = _load_text_tokenizer(text_tokenizer or cfg.data.text_tokenizer)
            write_hf_llm(parts.pop("llm"), cfg.model.llm, tmp / "llm", dtype, max_shard_size, tokenizer)
            components.append("llm")
        if "tokenizer" in parts:
            with torch.device("meta"):
                vision_tokenizer = VQTokenizer(cfg.model.tokenizer)
            tensors = {k: _materialize(v) for k, v in parts.pop("tokenizer").items()}
            vision_tokenizer.load_state_dict(tensors, assign=True, strict=True)
            vision_tokenizer.save_pretrained(tmp / "vision_tokenizer")
            del vision_tokenizer, tensors
            components.append("vision_tokenizer")
        hidden, codes = cfg.model.llm.hidden_size, cfg.model.tokenizer.codebook_size
        simple_configs = {
            "projector": {
                "depth": cfg.model.projector.depth,
                "code_dim": cfg.model.tokenizer.code_dim,
                "hidden_size": hidden,
            },
            "visual_head": {"hidden_size": hidden, "codebook_size": codes},
            "index_embedding": {"hidden_size": hidden, "codebook_size": codes},
        }
        for name in SIMPLE_COMPONENTS:
            if name in parts:
                _save_simple(tmp / name, name, parts.pop(name), simple_configs[name], dtype)
                components.append(name)
        if discriminator_state:
            _save_simple(tmp / "discriminator", "discriminator", discriminator_state, {}, None)
            components.append("discriminator")
        hf_model = write_hf_model(tmp, cfg, components, tokenizer, dtype)
        manifest = {
            "format": "ett-export",
            "version": 1,
            "components": components,
            "dtype": str(dtype or torch.float32).removeprefix("torch."),
            "hf_model": hf_model,
            **provenance,
            "config": to_dict(cfg),
        }
        (tmp / EXPORT_CONFIG).write_text(json.dumps(manifest, indent=1))
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_export_config(export_dir: str | Path) -> dict:
    path = Path(export_dir) / EXPORT_CONFIG
    if not path.is_file():
        raise ExportError(f"{export_dir}: not an ETT export / hand-off directory (no {EXPORT_CONFIG})")
    return json.loads(path.read_text())


def load_handoff_state_dict(export_dir: str | Path) -> dict[str, torch.Tensor]:
    """An export directory -> full ETTModel state dict ('llm.*', 'tokenizer.*', 'projector.*', ...)."""
    export_dir = Path(export_dir)
    manifest = read_export_config(export_dir)
    state: dict[str, torch.Tensor] = {}
    for component in manifest["components"]:
        if component == "llm":
            llm = load_component_state_dict(export_dir / "llm", "llm")
            state.update({f"llm.{k}": v for k, v in llm.items()})
        elif component == "vision_tokenizer":
            tok = load_component_state_dict(export_dir / "vision_tokenizer", "tokenizer")
            state.update({f"tokenizer.{k}": v for k, v in tok.items()})
        elif component in SIMPLE_COMPONENTS:
            path = export_dir / component / "model.safetensors"
            if not path.is_file():
                raise ExportError(f"{export_dir}: component '{component}' is listed but {path} is missing")
            state.update({f"{component}.{k}": v for k, v in load_file(str(path)).items()})
    return state


def load_component_state_dict(path: str | Path, component: str) -> dict[str, torch.Tensor]:
    """Weights of one component from: an export directory, a transformers LLM directory (config.json), our LLM
    format (llm_config.json, from training.hf_import), or a VQTokenizer directory."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such directory (expected the {component} weights)")
    if (path / EXPORT_CONFIG).is_file():
        sub = "llm" if component == "llm" else "vision_tokenizer"
        return load_component_state_dict(path / sub, component)
    if component == "llm":
        if (path / "llm_config.json").is_file():
            from modeling.llm import DecoderLM

            return DecoderLM.from_pretrained(path).state_dict()
        from training.hf_convert import read_hf_llm

        return read_hf_llm(path)[0]
    from modeling.tokenizer import VQTokenizer

    return VQTokenizer.from_pretrained(path).state_dict()


def load_discriminator(discriminator: torch.nn.Module, export_dir: str | Path) -> bool:
    """Load the hand-off's discriminator if it has one (stage 0 -> stage 2). Returns whether it did."""
    path = Path(export_dir) / "discriminator" / "model.safetensors"
    if not path.is_file():
        return False
    discriminator.load_state_dict(load_file(str(path)))
    return True


def _resolve_tag_dir(checkpoint: Path, tag: str | None) -> Path:
    from training.checkpoint import COMPLETE_MARKER, TRAINER_STATE, is_complete, list_complete

    if not checkpoint.exists():
        raise ExportError(f"--checkpoint {checkpoint}: no such directory")
    if (checkpoint / TRAINER_STATE).exists() or (checkpoint / COMPLETE_MARKER).exists():
        root, tag = checkpoint.parent, checkpoint.name
    else:
        root = checkpoint
        if tag is None:
            tags = list_complete(root)
            if not tags:
                raise ExportError(
                    f"{root}: no complete checkpoint (step* directories with a COMPLETE marker)"
                )
            tag = tags[-1]
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise ExportError(f"{tag_dir}: no such checkpoint (complete tags in {root}: {list_complete(root)})")
    if not is_complete(tag_dir):
        raise ExportError(f"{tag_dir}: incomplete checkpoint (no COMPLETE marker); a save was interrupted")
    return tag_dir


def consolidate_checkpoint(checkpoint: str | Path, tag: str | None = None, lazy: bool = True):
    """(state dict, trainer state, tag dir) of a complete ZeRO checkpoint of any world size. With `lazy` the
    values are DeepSpeed's GatheredTensors (`.shape`, `.contiguous()` gathers one tensor) over memory-mapped shards.
    Missing shard files raise ExportError naming every missing file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from training.checkpoint import TRAINER_STATE

    tag_dir = _resolve_tag_dir(Path(checkpoint), tag)
    trainer_state = json.loads((tag_dir / TRAINER_STATE).read_text())
    world = int(trainer_state["world_size"])
    missing = []
    for rank in range(world):
        stem = f"zero_pp_rank_{rank}_mp_rank_00"
        if not (tag_dir / f"{stem}_model_states.pt").is_file():
            missing.append(f"{stem}_model_states.pt")
        if not any(tag_dir.glob(f"*{stem}_optim_states.pt")):
            missing.append(f"{stem}_optim_states.pt")
    if missing and (tag_dir / "mp_rank_00_model_states.pt").is_file():
        raise ExportError(
            f"{tag_dir}: a checkpoint without ZeRO partitioning (deepspeed.zero_stage=0) is not supported; "
            "export from a ZeRO-1/2/3 run or use its final/ hand-off directory"
        )
    if missing:
        raise ExportError(f"{tag_dir}: checkpoint of world size {world} is missing shard files {missing}")
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, lazy_mode=lazy
        )
    except (ValueError, KeyError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise ExportError(f"{tag_dir}: DeepSpeed could not consolidate the shards: {exc}") from None
    return state, trainer_state, tag_dir


def check_against_config(state: dict, cfg) -> None:
    """Compare the consolidated tensors with the model the config describes; name every mismatch."""
    from training.stages import build_model

    kind = cfg.stage.kind
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {found[k]} vs config {expected[k]}"
        for k in expected
        if k in found and found[k] != expected[k]
    )

    def listed(names: list[str]) -> str:
        return f"{names[:8]}{f' ... ({len(names)} in all)' if len(names) > 8 else ''}"

    problems = []
    if missing:
        problems.append(f"missing tensors {listed(missing)}")
    if unexpected:
        problems.append(f"tensors the config has no place for {listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {listed(wrong)}")
    if problems:
        raise ExportError(
            f"checkpoint does not match its model configuration (stage.kind={kind}): " + "; ".join(problems)
        )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    text_tokenizer: str | None = None,
) -> Path:
    """Consolidate a ZeRO checkpoint (lazily) and write the export layout to `out_dir`."""
    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    state, trainer_state, tag_dir = consolidate_checkpoint(checkpoint, tag, lazy=True)
    if "config" not in trainer_state:
        raise ExportError(f"{tag_dir}: trainer_state.json has no 'config' (the run config of the checkpoint)")
    cfg = run_config_from_dict(trainer_state["config"])
    check_against_config(state, cfg)
    disc_path = tag_dir / "discriminator.safetensors"
    disc = load_file(str(disc_path)) if disc_path.is_file() else None
    provenance = {
        k: trainer_state[k]
        for k in ("stage", "kind", "step", "consumed_samples", "consumed_tokens", "world_size")
        if k in trainer_state
    }
    provenance["checkpoint"] = str(tag_dir.resolve())
    return write_export(
        state,
        cfg,
        out_dir,
        provenance,
        dtype={"fp32": None, "bf16": torch.bfloat16}[dtype],
        max_shard_size=max_shard_size,
        discriminator_state=disc,
        text_tokenizer=text_tokenizer,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a ZeRO checkpoint (any world size) to a Hugging Face LLM directory plus the vision "
        "tokenizer, projector and visual head (safetensors + JSON). The result is also a stage hand-off "
        "(stage.init_from) and the input of `python -m training.infer`.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a stage's checkpoints/ directory or one tag directory"
    )
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    parser.add_argument("--out", required=True, help="export directory (written atomically)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="LLM / projector dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="largest LLM safetensors shard, e.g. 500MB")
    parser.add_argument(
        "--text-tokenizer", default=None, help="text tokenizer to ship with llm/ (default: the run's)"
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(
            args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_size, args.text_tokenizer
        )
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
