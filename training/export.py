"""Hugging Face export from ZeRO-3 checkpoints; the same layout is the stage hand-off format.

    python -m training.export --checkpoint RUN/checkpoints [--tag step00000100] --out EXPORT [--dtype bf16|fp32]

EXPORT/
  ett_config.json      ties the parts together: provenance (stage, step, samples seen) and the full run config
  llm/                 a transformers model directory (config.json, model*.safetensors [+ index], generation_config.json,
                       text tokenizer files): AutoModelForCausalLM / AutoTokenizer load it with no custom code
  vision_tokenizer/    VQTokenizer.save_pretrained (safetensors + tokenizer_config.json)
  projector/ visual_head/ index_embedding/ discriminator/
                       model.safetensors + config.json, where the model has them

Memory: the checkpoint is consolidated once into fp32 (DeepSpeed's get_fp32_state_dict_from_zero_checkpoint); each
component is then built on the meta device and takes those tensors by assignment (`load_state_dict(assign=True)`),
so no second full copy exists; safetensors writes one shard at a time. The export is written to a temporary
directory and renamed into place, so a failed export never leaves a partial directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXPORT_CONFIG = "ett_config.json"
SIMPLE_COMPONENTS = ("projector", "visual_head", "index_embedding")


class ExportError(RuntimeError):
    """The checkpoint or export directory is unusable; the message names what is missing."""


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        parts.setdefault(head, {})[rest] = value
    return parts


def _save_simple(out: Path, name: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    out.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps({"component": name, **config}, indent=1))


def write_export(
    state: dict[str, torch.Tensor],
    cfg,
    out_dir: str | Path,
    provenance: dict,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
    discriminator_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the export layout from a full ETTModel state dict (keys 'llm.*', 'tokenizer.*', 'projector.*', ...)."""
    from modeling.llm import DecoderLM
    from modeling.tokenizer import VQTokenizer
    from training.config import to_dict
    from training.hf_convert import save_hf_llm

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        parts = _split(state)
        components = []
        if "llm" in parts:
            with torch.device("meta"):
                llm = DecoderLM(cfg.model.llm)
            llm.load_state_dict(parts["llm"], assign=True, strict=False)
            save_hf_llm(llm, tmp / "llm", dtype=dtype, max_shard_size=max_shard_size)
            if cfg.data.text_tokenizer:
                from data_pipeline.text_tokenizer import TextTokenizer

                TextTokenizer.load(cfg.data.text_tokenizer).save(tmp / "llm")
            components.append("llm")
        if "tokenizer" in parts:
            with torch.device("meta"):
                tokenizer = VQTokenizer(cfg.model.tokenizer)
            tokenizer.load_state_dict(parts["tokenizer"], assign=True, strict=False)
            tokenizer.save_pretrained(tmp / "vision_tokenizer")
            components.append("vision_tokenizer")
        simple_configs = {
            "projector": {
                "depth": cfg.model.projector.depth,
                "code_dim": cfg.model.tokenizer.code_dim,
                "hidden_size": cfg.model.llm.hidden_size,
            },
            "visual_head": {
                "hidden_size": cfg.model.llm.hidden_size,
                "codebook_size": cfg.model.tokenizer.codebook_size,
            },
            "index_embedding": {
                "hidden_size": cfg.model.llm.hidden_size,
                "codebook_size": cfg.model.tokenizer.codebook_size,
            },
        }
        for name in SIMPLE_COMPONENTS:
            if name in parts:
                tensors = parts[name] if dtype is None else {k: v.to(dtype) for k, v in parts[name].items()}
                _save_simple(tmp / name, name, tensors, simple_configs[name])
                components.append(name)
        if discriminator_state:
            _save_simple(tmp / "discriminator", "discriminator", discriminator_state, {})
            components.append("discriminator")
        manifest = {
            "format": "ett-export",
            "version": 1,
            "components": components,
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
            state.update(
                {f"llm.{k}": v for k, v in load_component_state_dict(export_dir / "llm", "llm").items()}
            )
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
        from training.hf_convert import load_hf_llm

        model, _ = load_hf_llm(path)
        return model.state_dict()
    from modeling.tokenizer import VQTokenizer

    return VQTokenizer.from_pretrained(path).state_dict()


def load_discriminator(discriminator: torch.nn.Module, export_dir: str | Path) -> bool:
    """Load the hand-off's discriminator if it has one (stage 0 -> stage 2). Returns whether it did."""
    path = Path(export_dir) / "discriminator" / "model.safetensors"
    if not path.is_file():
        return False
    discriminator.load_state_dict(load_file(str(path)))
    return True


def consolidate_checkpoint(checkpoint: str | Path, tag: str | None = None):
    """(fp32 state dict, trainer state, tag dir) of a complete checkpoint of any world size.
    Missing shard files or an incomplete checkpoint raise ExportError naming them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from training.checkpoint import COMPLETE_MARKER, TRAINER_STATE, is_complete, list_complete

    checkpoint = Path(checkpoint)
    if (checkpoint / TRAINER_STATE).exists() or (checkpoint / COMPLETE_MARKER).exists():
        root, tag = checkpoint.parent, checkpoint.name
    else:
        root = checkpoint
        if tag is None:
            tags = list_complete(root)
            if not tags:
                raise ExportError(f"{root}: no complete checkpoint (directories with a COMPLETE marker)")
            tag = tags[-1]
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise ExportError(f"{tag_dir}: no such checkpoint")
    if not is_complete(tag_dir):
        raise ExportError(f"{tag_dir}: incomplete checkpoint (no COMPLETE marker); a save was interrupted")
    trainer_state = json.loads((tag_dir / TRAINER_STATE).read_text())
    world = int(trainer_state["world_size"])
    expected = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    optim = sorted(p.name for p in tag_dir.glob("*optim_states.pt"))
    missing = [name for name in expected if not (tag_dir / name).is_file()]
    if len(optim) != world:
        missing.append(f"optimizer shards: found {len(optim)} of {world} ({optim})")
    if missing:
        raise ExportError(f"{tag_dir}: checkpoint of world size {world} is missing shard files: {missing}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return state, trainer_state, tag_dir


def check_against_config(state: dict[str, torch.Tensor], cfg) -> None:
    """Compare the consolidated tensors with the model the config describes; name every mismatch."""
    from modeling.ett import ETTModel

    kind = cfg.stage.kind
    with torch.device("meta"):
        model = ETTModel(
            cfg.model.llm,
            cfg.model.tokenizer,
            cfg.model.projector,
            cfg.model.ett,
            with_llm=kind != "tokenizer",
            with_tokenizer=kind != "llm_pretrain",
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("vq_loss.")}
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    )
    if missing or wrong:
        raise ExportError(
            "checkpoint does not match its model configuration: "
            + (f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + (f"shape mismatches {wrong[:8]}" if wrong else "")
        )


def export_checkpoint(
    checkpoint, out_dir, tag=None, dtype: str = "fp32", max_shard_size: str = "5GB"
) -> Path:
    from training.config import from_dict
    from training.run_config import TrainConfig

    state, trainer_state, tag_dir = consolidate_checkpoint(checkpoint, tag)
    cfg = from_dict(TrainConfig, trainer_state["config"])
    check_against_config(state, cfg)
    disc_path = tag_dir / "discriminator.safetensors"
    disc = load_file(str(disc_path)) if disc_path.is_file() else None
    provenance = {
        k: trainer_state[k]
        for k in ("stage", "kind", "step", "consumed_samples", "consumed_tokens")
        if k in trainer_state
    }
    provenance["checkpoint"] = str(tag_dir)
    torch_dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype]
    return write_export(
        state,
        cfg,
        out_dir,
        provenance,
        dtype=torch_dtype,
        max_shard_size=max_shard_size,
        discriminator_state=disc,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a ZeRO-3 checkpoint (any world size) to a Hugging Face LLM directory plus the vision "
        "tokenizer, projector and visual head (safetensors + JSON).",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a stage's checkpoints/ directory or one tag directory"
    )
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    parser.add_argument("--out", required=True, help="export directory (replaced atomically)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_size)
    except ExportError as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
