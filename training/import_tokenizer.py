"""Pretrained VQGAN-style image tokenizers -> our VQTokenizer directory (docs/import_tokenizer.md).

    python -m training.import_tokenizer --format seed-voken-ibq|taming|janus-hf --input PATH --out DIR
        [--config YAML] [--ema] [--codebook-size K --data DATASET_OR_IMAGE_DIR [--data-samples N]]
        [--image-size S] [--unsafe-pickle]

DIR gets what `VQTokenizer.from_pretrained` reads (tokenizer_config.json + model.safetensors), so a stage points
at it with `stage.init_tokenizer_from` (training/stages.py `load_initial_weights`, which also loads into ZeRO-3
partitioned parameters), plus `import_summary.json` (every source key and where it went, or why it was not
imported) and, when the source's PatchGAN discriminator has our layout, `discriminator/` (model.safetensors +
config.json).

Formats:
- `seed-voken-ibq`: a SEED-Voken IBQ Lightning `.ckpt` (weights under "state_dict", model arguments under
  "hyper_parameters", or a config YAML with --config). IndexPropagationQuantize -> our IBQ quantizer. `--ema`
  takes the `model_ema.<key without dots>` weights (SEED-Voken's LitEma).
- `taming`: a taming-transformers VQGAN checkpoint (same layout; VectorQuantizer2 -> our VQ quantizer).
- `janus-hf`: a transformers `JanusVQVAE` directory (config.json + safetensors), or a whole Janus model directory
  (JanusForConditionalGeneration: its `vq_config` and `model.vqmodel.*`; key names in messages drop that
  prefix). The decoder's `up` list is in
  execution order there (taming prepends, so its index runs the other way). transformers' Janus looks codes up on
  the raw z and codebook but L2-normalises the looked-up codes on decode (`get_codebook_entry`); the import keeps
  the raw codebook and sets `vq_output_l2_normalize`, which reproduces both (forward indices and decoded images).

Key mapping (source -> ours): `{encoder,decoder}.{conv_in,mid.*,norm_out,conv_out}` unchanged except that each
attention's separate `q`, `k`, `v` 1x1 convs are concatenated into our `qkv`; `encoder.down.i.{block,attn}.j` ->
`encoder.levels.i.{blocks,attns}.j`, `encoder.down.i.downsample` -> `encoder.levels.i.resample`;
`decoder.up.i.{block,attn,upsample}` -> `decoder.levels.(n-1-i).{blocks,attns,resample}` (taming/IBQ) or
`decoder.levels.i.*` (Janus); `quantize.embedding.weight` -> `quantizer.embedding.weight`; `quant_conv`,
`post_quant_conv` unchanged. Every model key must be used and every expected key present, with its shape: a
mismatch raises an error naming the file, the key and the expected and found shapes.

`--codebook-size K` encodes a data sample (a dataset directory of our Arrow format, or a folder of image files),
keeps the K most used codes (ties: lower index first), in their original order, and reports codes used and
perplexity before and after. An image whose codes are all kept gets the same codes after the resize, renumbered
by `import_summary.json`'s "kept_codes" (new index i = old index kept_codes[i]).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeling.tokenizer import PatchDiscriminator, TokenizerConfig, VQLossConfig, VQTokenizer

FORMATS = ("seed-voken-ibq", "taming", "janus-hf")
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
SUMMARY_NAME = "import_summary.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TokenizerImportError(ValueError):
    """The source cannot be imported as it is; the message names the file, the keys and the shapes."""


@dataclass
class SourceTokenizer:
    """What was read from the source: tensors, the model arguments (or None) and where they came from."""

    state: dict[str, torch.Tensor]
    model_args: dict[str, Any] | None
    file: str
    other_entries: list[str] = field(default_factory=list)  # top-level checkpoint entries besides the weights
    skipped: dict[str, list[str]] = field(
        default_factory=dict
    )  # reason -> keys not read as tokenizer weights


# ---------------------------------------------------------------------------------------------------- reading


def _torch_load(path: Path, unsafe_pickle: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what weights_only refuses
        if unsafe_pickle:
            raise TokenizerImportError(f"{path}: cannot read the checkpoint: {exc}") from None
        raise TokenizerImportError(
            f"{path}: torch.load(weights_only=True) refused the checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). If you trust the file, pass --unsafe-pickle "
            "(full unpickling runs code from the file)"
        ) from None


def _find_model_args(tree: Any) -> dict | None:
    """The model's constructor arguments (the dict holding `ddconfig`) in hyper_parameters or a config YAML
    (SEED-Voken: model.init_args; taming: model.params)."""
    if not isinstance(tree, dict):
        return None
    if "ddconfig" in tree:
        return tree
    for key in ("model", "init_args", "params"):
        found = _find_model_args(tree.get(key))
        if found is not None:
            return found
    return None


def _plain(value: Any) -> Any:
    """OmegaConf / AttributeDict / tuples -> plain dicts and lists (JSON-able)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def read_lightning_checkpoint(path: Path, config: Path | None, unsafe_pickle: bool) -> SourceTokenizer:
    if not path.is_file():
        raise TokenizerImportError(f"--input {path}: no such file (expected a Lightning .ckpt)")
    data = _torch_load(path, unsafe_pickle)
    if not isinstance(data, dict):
        raise TokenizerImportError(f"{path}: a {type(data).__name__}, expected a checkpoint dict")
    if "state_dict" in data:
        state, others = data["state_dict"], sorted(k for k in data if k != "state_dict")
    else:
        state, others = data, []
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenizerImportError(f"{path}: 'state_dict' holds non-tensor values")
    args = None
    if config is not None:
        import yaml

        if not config.is_file():
            raise TokenizerImportError(f"--config {config}: no such file")
        args = _find_model_args(yaml.safe_load(config.read_text()))
        if args is None:
            raise TokenizerImportError(f"--config {config}: no model arguments with a 'ddconfig' found")
    elif "hyper_parameters" in data:
        args = _find_model_args(_plain(data["hyper_parameters"]))
    if args is not None and config is None:
        others = [k for k in others if k != "hyper_parameters"]  # read: it gave the config
    return SourceTokenizer(dict(state), _plain(args) if args else None, str(path), others)


def read_janus_directory(path: Path) -> SourceTokenizer:
    """A JanusVQVAE directory, or a whole Janus model directory (JanusForConditionalGeneration: config.json with a
    `vq_config`, tokenizer weights under `model.vqmodel.`; only those tensors are read, the others are listed)."""
    from safetensors import safe_open

    config_path = path / "config.json"
    if not config_path.is_file():
        raise TokenizerImportError(
            f"--input {path}: no config.json (expected a JanusVQVAE or Janus model save_pretrained dir)"
        )
    config = json.loads(config_path.read_text())
    prefix = ""
    if config.get("model_type") == "janus" and isinstance(config.get("vq_config"), dict):
        config, prefix = config["vq_config"], "model.vqmodel."
    elif config.get("model_type") != "janus_vqgan":
        raise TokenizerImportError(
            f"{config_path}: model_type={config.get('model_type')!r}, expected 'janus_vqgan' (a JanusVQVAE) or "
            "'janus' (a Janus model with a vq_config)"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise TokenizerImportError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    others: list[str] = []
    for name in files:
        with safe_open(str(path / name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    state[key.removeprefix(prefix)] = handle.get_tensor(key)
                else:
                    others.append(key)
    source = SourceTokenizer(state, config, str(path / files[0]) if len(files) == 1 else str(path))
    if others:
        source.skipped["rest of the Janus model (LLM, vision encoder, aligners, heads)"] = sorted(others)
    return source


# ---------------------------------------------------------------------------------------------------- config


def _loss_from_ibq(args: dict) -> VQLossConfig:
    """The loss weights SEED-Voken's VQLPIPSWithDiscriminator has a counterpart for (entropy, generator, LeCam,
    quantisation, discriminator start and depth). perceptual_weight stays at our default 0: LPIPS needs a local
    weights file (model.tokenizer.loss.perceptual_weights_path), so a stage sets both."""
    params = (
        (args.get("lossconfig") or {}).get("params") or (args.get("lossconfig") or {}).get("init_args") or {}
    )
    loss = VQLossConfig()
    use_entropy = bool(args.get("use_entropy_loss", False))
    loss.entropy_weight = float(params.get("entropy_loss_weight", 0.0)) if use_entropy else 0.0
    for ours, theirs in (
        ("gan_weight", "gen_loss_weight"),
        ("lecam_weight", "lecam_loss_weight"),
        ("quant_weight", "quant_loss_weight"),
        ("gan_start_step", "disc_start"),
    ):
        if theirs in params:
            setattr(loss, ours, type(getattr(loss, ours))(params[theirs]))
    if "disc_num_layers" in params:
        loss.disc_layers = int(params["disc_num_layers"])
    return loss


def config_from_args(fmt: str, args: dict) -> tuple[TokenizerConfig, list[str]]:
    """Our TokenizerConfig from SEED-Voken / taming model arguments (ddconfig, n_embed, embed_dim, ...)."""
    dd, notes = args["ddconfig"], []
    if dd.get("double_z", False):
        raise TokenizerImportError("ddconfig.double_z=True (a KL autoencoder's encoder): not a VQ tokenizer")
    if dd.get("out_ch", dd.get("in_channels", 3)) != dd.get("in_channels", 3):
        raise TokenizerImportError(
            f"ddconfig.out_ch={dd.get('out_ch')} differs from in_channels={dd.get('in_channels')}: our tokenizer "
            "decodes to its input channels"
        )
    if float(dd.get("dropout", 0.0)):
        notes.append(
            f"ddconfig.dropout={dd['dropout']}: our modules have no dropout (identical in eval mode)"
        )
    if args.get("l2_normalize"):
        raise TokenizerImportError(
            "l2_normalize=True: SEED-Voken's VectorQuantizer2 then looks up by cosine similarity but returns the raw "
            "code; our quantizers cannot represent that"
        )
    loss = _loss_from_ibq(args) if fmt == "seed-voken-ibq" else VQLossConfig(entropy_weight=0.0)
    cfg = TokenizerConfig(
        resolution=int(dd["resolution"]),
        in_channels=int(dd.get("in_channels", 3)),
        base_channels=int(dd["ch"]),
        channel_mult=tuple(int(m) for m in dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", ())),
        norm_groups=32,
        z_channels=int(dd["z_channels"]),
        code_dim=int(args["embed_dim"]),
        codebook_size=int(args["n_embed"]),
        quantizer="ibq" if fmt == "seed-voken-ibq" else "vq",
        beta=float(args.get("beta", 0.25)),
        entropy_temperature=float(args.get("entropy_temperature", 0.01)),
        loss=loss,
    )
    return cfg, notes


def config_from_weights(fmt: str, state: dict[str, torch.Tensor]) -> tuple[TokenizerConfig, list[str]]:
    """Architecture read off the tensor shapes (no hyper_parameters and no --config). The nominal resolution is
    unknown; 256 is assumed and the attention levels are placed where the weights have them."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise TokenizerImportError(
                f"cannot infer the architecture: key {key!r} is missing (pass --config)"
            )
        return tuple(state[key].shape)

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise TokenizerImportError("cannot infer the architecture: no encoder.down.* keys (pass --config)")
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    blocks = len({m.group(1) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    resolution = 256
    attn = tuple(
        resolution // 2**i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in state)
    )
    code_k, code_dim = shape("quantize.embedding.weight")
    cfg = TokenizerConfig(
        resolution=resolution,
        in_channels=shape("encoder.conv_in.weight")[1],
        base_channels=ch,
        channel_mult=mult,
        num_res_blocks=blocks,
        attn_resolutions=attn,
        norm_groups=32,
        z_channels=shape("encoder.conv_out.weight")[0],
        code_dim=code_dim,
        codebook_size=code_k,
        quantizer="ibq" if fmt == "seed-voken-ibq" else "vq",
        loss=VQLossConfig(entropy_weight=0.05 if fmt == "seed-voken-ibq" else 0.0),
    )
    return cfg, [
        "no model arguments in the checkpoint and no --config: architecture inferred from the tensor "
        f"shapes, nominal resolution {resolution} assumed"
    ]


def config_from_janus(config: dict) -> tuple[TokenizerConfig, list[str]]:
    notes = []
    if config.get("double_latent", False):
        raise TokenizerImportError("JanusVQVAEConfig.double_latent=True: not supported (conv_out is 2x wide)")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise TokenizerImportError(
            f"JanusVQVAEConfig in_channels={config.get('in_channels')} != out_channels={config.get('out_channels')}"
        )
    if float(config.get("dropout", 0.0)):
        notes.append(f"dropout={config['dropout']}: our modules have no dropout (identical in eval mode)")
    mult = tuple(int(m) for m in config["channel_multiplier"])
    patches = int(config["num_patches"])
    cfg = TokenizerConfig(
        resolution=patches * 2 ** (len(mult) - 1),
        in_channels=int(config.get("in_channels", 3)),
        base_channels=int(config["base_channels"]),
        channel_mult=mult,
        num_res_blocks=int(config["num_res_blocks"]),
        attn_resolutions=(
            patches,
        ),  # Janus: attention at the lowest level only (encoder's last, decoder's first)
        norm_groups=32,
        z_channels=int(config["latent_channels"]),
        code_dim=int(config["embed_dim"]),
        codebook_size=int(config["num_embeddings"]),
        quantizer="vq",
        vq_output_l2_normalize=True,
        beta=float(config.get("beta", 0.25)),
        loss=VQLossConfig(entropy_weight=0.0),
    )
    notes.append(
        "Janus: raw nearest-code lookup, L2-normalised codes on decode -> quantizer='vq', "
        "vq_output_l2_normalize=True (codebook stored raw)"
    )
    return cfg, notes


# ---------------------------------------------------------------------------------------------------- mapping


def source_keys(our_key: str, num_levels: int, reverse_up: bool) -> list[str]:
    """The source key(s) of one of our tokenizer's state-dict keys: 3 (q, k, v) for an attention's qkv."""
    key = our_key
    m = re.match(r"(encoder|decoder)\.levels\.(\d+)\.(blocks|attns|resample)\.(.*)", key)
    if m:
        part, i, kind, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if part == "encoder":
            head, resample = f"encoder.down.{i}", "downsample"
        else:
            head, resample = f"decoder.up.{num_levels - 1 - i if reverse_up else i}", "upsample"
        key = f"{head}.{ {'blocks': 'block', 'attns': 'attn', 'resample': resample}[kind] }.{rest}"
    if key.startswith("quantizer."):
        key = "quantize." + key.removeprefix("quantizer.")
    if ".qkv." in key:
        return [key.replace(".qkv.", f".{p}.") for p in ("q", "k", "v")]
    return [key]


def ema_key(key: str) -> str:
    """SEED-Voken's LitEma buffer name of a parameter: 'model_ema.' + the name with its dots removed."""
    return "model_ema." + key.replace(".", "")


def _fmt_shape(shape) -> str:
    return str(list(shape))


def _listed(lines: list[str], limit: int = 40) -> str:
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n  " + "\n  ".join(lines[:limit]) + more


def map_state_dict(
    source: SourceTokenizer, cfg: TokenizerConfig, fmt: str, use_ema: bool
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Source tensors -> our tokenizer's state dict, strictly. Returns (state, skipped: reason -> source keys).
    Raises TokenizerImportError naming every missing, unexpected and mis-shaped key."""
    with torch.device("meta"):
        model = VQTokenizer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    num_levels = len(cfg.channel_mult)
    reverse_up = fmt != "janus-hf"
    state, file = source.state, source.file

    # where each expected source key comes from (EMA name with --ema) and its expected shape
    wanted: dict[str, tuple[str, int, tuple[int, ...]]] = {}  # source key -> (our key, part, shape)
    for ours, shape in expected.items():
        names = source_keys(ours, num_levels, reverse_up)
        part_shape = (shape[0] // len(names), *shape[1:])
        for part, name in enumerate(names):
            wanted[ema_key(name) if use_ema else name] = (ours, part, part_shape)

    problems: list[str] = []
    for name, (ours, _, shape) in wanted.items():
        if name not in state:
            problems.append(f"missing: {file}: {name} (expected shape {_fmt_shape(shape)}, for our {ours})")
        elif tuple(state[name].shape) != shape:
            problems.append(
                f"wrong shape: {file}: {name}: expected {_fmt_shape(shape)}, found {_fmt_shape(state[name].shape)} "
                f"(for our {ours})"
            )

    skipped: dict[str, list[str]] = {}
    model_keys = {k for k in state if k.startswith(MODEL_PREFIXES)}
    if use_ema:
        wanted_plain = {n for ours in expected for n in source_keys(ours, num_levels, reverse_up)}
        skipped["non-EMA model weights (replaced by the EMA weights, --ema)"] = sorted(
            model_keys & wanted_plain
        )
        model_keys -= wanted_plain
    for name in sorted(set(state) - set(wanted)):
        if use_ema and name in wanted_plain:
            continue  # listed above
        if name in model_keys:
            problems.append(
                f"unexpected: {file}: {name} (shape {_fmt_shape(state[name].shape)}): our tokenizer has no place for it"
            )
        elif name.startswith("model_ema."):
            reason = (
                "EMA bookkeeping and EMA copies of other modules"
                if use_ema
                else "EMA weights (pass --ema to import them instead)"
            )
            skipped.setdefault(reason, []).append(name)
        elif name.startswith("loss.perceptual_loss."):
            skipped.setdefault(
                "LPIPS network (ours loads its own, see modeling/tokenizer/perceptual.py)", []
            ).append(name)
        elif name.startswith("loss.discriminator."):
            pass  # handled by map_discriminator
        elif name.startswith("loss."):
            skipped.setdefault("other training-loss state", []).append(name)
        else:
            problems.append(
                f"unexpected: {file}: {name} (shape {_fmt_shape(state[name].shape)}): not a tokenizer, loss or EMA key"
            )
    if problems:
        raise TokenizerImportError(
            f"{file} does not match the {fmt} tokenizer described by its config "
            f"({len(problems)} problems):{_listed(problems)}"
        )
    out: dict[str, torch.Tensor] = {}
    for ours in expected:
        names = source_keys(ours, num_levels, reverse_up)
        tensors = [state[ema_key(n) if use_ema else n].float() for n in names]
        out[ours] = (torch.cat(tensors, 0) if len(tensors) > 1 else tensors[0]).contiguous().clone()
    return out, skipped


def map_discriminator(
    state: dict[str, torch.Tensor], file: str
) -> tuple[dict[str, torch.Tensor] | None, VQLossConfig | None, str]:
    """`loss.discriminator.*` -> our PatchDiscriminator with BatchNorm (pix2pix NLayerDiscriminator, as taming and
    SEED-Voken use), when the layout matches key for key. Returns (state, loss config, message)."""
    prefix = "loss.discriminator."
    disc = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not disc:
        return None, None, "no discriminator in the source"
    convs = sorted(
        int(m.group(1))
        for k, v in disc.items()
        if (m := re.match(r"main\.(\d+)\.weight$", k)) and v.dim() == 4
    )
    if "main.0.weight" not in disc or len(convs) < 3:
        return None, None, f"skipped: {file}: loss.discriminator.* is not a pix2pix NLayerDiscriminator"
    loss = VQLossConfig(
        disc_ndf=disc["main.0.weight"].shape[0], disc_layers=len(convs) - 2, disc_norm="batch"
    )
    try:
        with torch.device("meta"):
            ours = PatchDiscriminator(loss, disc["main.0.weight"].shape[1])
    except ValueError as exc:
        return None, None, f"skipped: {exc}"
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in disc.items()}
    if expected != found:
        diff = sorted(
            [f"missing {prefix}{k} {_fmt_shape(s)}" for k, s in expected.items() if k not in found]
            + [f"unexpected {prefix}{k} {_fmt_shape(s)}" for k, s in found.items() if k not in expected]
            + [
                f"{prefix}{k}: expected {_fmt_shape(s)}, found {_fmt_shape(found[k])}"
                for k, s in expected.items()
                if k in found and found[k] != s
            ]
        )
        return (
            None,
            None,
            f"skipped (layout differs from our PatchDiscriminator): {file}: {'; '.join(diff[:10])}",
        )
    tensors = {k: v.clone() if not v.is_floating_point() else v.float().clone() for k, v in disc.items()}
    return (
        tensors,
        loss,
        (
            f"imported to discriminator/: ndf={loss.disc_ndf}, layers={loss.disc_layers}, norm=batch (the loss.disc_* "
            "of tokenizer_config.json match it; the trainer loads a discriminator from a stage.init_from hand-off only)"
        ),
    )


# ---------------------------------------------------------------------------------------------------- codebook


def load_sample_images(path: Path, count: int, size: int) -> torch.Tensor:
    """Up to `count` images in [-1, 1], [N, 3, size, size] (centre crop + resize, as training does), from a dataset
    directory of our Arrow format (every image segment, in shard order) or a folder of image files (sorted)."""
    from data_pipeline.processing import decode_image
    from data_pipeline.shards import MANIFEST, ShardDataset

    blobs: list[bytes] = []
    if (path / MANIFEST).is_file():
        dataset = ShardDataset(path)
        for shard, rows in enumerate(dataset.shard_rows):
            for index in range(rows):
                for seg in dataset.row(shard, index)["segments"]:
                    if seg.get("image") is not None and len(blobs) < count:
                        blobs.append(seg["image"])
                if len(blobs) >= count:
                    break
            if len(blobs) >= count:
                break
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        blobs = [p.read_bytes() for p in files[:count]]
    else:
        raise TokenizerImportError(f"--data {path}: no such directory")
    if not blobs:
        raise TokenizerImportError(f"--data {path}: no images found")
    pixels = [torch.from_numpy(decode_image(b, (size, size))) for b in blobs]
    return torch.stack(pixels).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_all(tokenizer: VQTokenizer, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    tokenizer.eval()
    return torch.cat(
        [tokenizer.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def usage_summary(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    return {
        "codebook_size": codebook_size,
        "codes_used": int((counts > 0).sum()),
        "perplexity": math.exp(entropy),
        "positions": int(counts.sum()),
    }


def most_used_codes(indices: torch.Tensor, codebook_size: int, keep: int) -> torch.Tensor:
    """The `keep` most used code ids (ties: lower id first), sorted ascending."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size)
    order = sorted(range(codebook_size), key=lambda k: (-int(counts[k]), k))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def resize_codebook(state: dict[str, torch.Tensor], cfg: TokenizerConfig, kept: torch.Tensor):
    """A copy of (state, cfg) whose codebook holds only the rows `kept` (new id i = old id kept[i])."""
    import copy

    state = dict(state)
    state["quantizer.embedding.weight"] = state["quantizer.embedding.weight"][kept].contiguous().clone()
    cfg = copy.deepcopy(cfg)
    cfg.codebook_size = int(kept.numel())
    return state, cfg


# ---------------------------------------------------------------------------------------------------- command


def build_tokenizer(cfg: TokenizerConfig, state: dict[str, torch.Tensor]) -> VQTokenizer:
    with torch.device("meta"):
        model = VQTokenizer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.quantizer.code_ids = torch.arange(cfg.codebook_size)  # non-persistent buffer, not in the state dict
    return model.eval()


def import_tokenizer(
    fmt: str,
    input_path: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    use_ema: bool = False,
    codebook_size: int | None = None,
    data: str | Path | None = None,
    data_samples: int = 256,
    image_size: int | None = None,
    unsafe_pickle: bool = False,
) -> dict[str, Any]:
    """Import, write `out_dir` (atomically) and return the summary (also written to out_dir/import_summary.json)."""
    if fmt not in FORMATS:
        raise TokenizerImportError(f"--format {fmt!r}: expected one of {FORMATS}")
    input_path, out_dir = Path(input_path), Path(out_dir)
    if fmt == "janus-hf":
        if config is not None or use_ema:
            raise TokenizerImportError("--config and --ema do not apply to --format janus-hf")
        source = read_janus_directory(input_path)
        cfg, notes = config_from_janus(source.model_args)
    else:
        source = read_lightning_checkpoint(input_path, Path(config) if config else None, unsafe_pickle)
        if source.model_args is not None:
            cfg, notes = config_from_args(fmt, source.model_args)
        else:
            cfg, notes = config_from_weights(fmt, source.state)
    try:
        cfg.validate()
    except ValueError as exc:
        raise TokenizerImportError(
            f"the source config does not give a valid TokenizerConfig: {exc}"
        ) from None
    state, skipped = map_state_dict(source, cfg, fmt, use_ema)
    skipped.update(source.skipped)
    disc_state, disc_loss, disc_message = map_discriminator(source.state, source.file)
    disc_keys = sorted(k for k in source.state if k.startswith("loss.discriminator."))
    if disc_state is None and disc_keys:
        skipped[f"discriminator ({disc_message})"] = disc_keys
    if disc_loss is not None:
        cfg.loss.disc_ndf, cfg.loss.disc_layers, cfg.loss.disc_norm = (
            disc_loss.disc_ndf,
            disc_loss.disc_layers,
            "batch",
        )
    summary: dict[str, Any] = {
        "format": fmt,
        "source": str(input_path),
        "ema": use_ema,
        "notes": notes,
        "imported_tensors": len(state),
        "source_keys_used": sum(len(source_keys(k, len(cfg.channel_mult), fmt != "janus-hf")) for k in state),
        "discriminator": disc_message,
        "not_imported": {reason: keys for reason, keys in skipped.items() if keys},
        "checkpoint_entries_not_imported": source.other_entries,
    }
    if codebook_size is not None:
        if data is None:
            raise TokenizerImportError("--codebook-size needs --data (the images to measure code usage on)")
        if not 1 <= codebook_size <= cfg.codebook_size:
            raise TokenizerImportError(
                f"--codebook-size {codebook_size}: must lie in [1, {cfg.codebook_size}]"
            )
        images = load_sample_images(Path(data), data_samples, image_size or cfg.resolution)
        before = encode_all(build_tokenizer(cfg, state), images)
        kept = most_used_codes(before, cfg.codebook_size, codebook_size)
        size_before = cfg.codebook_size
        state, cfg = resize_codebook(state, cfg, kept)
        after = encode_all(build_tokenizer(cfg, state), images)
        summary["codebook_resize"] = {
            "images": len(images),
            "image_size": images.shape[-1],
            "before": usage_summary(before, size_before),
            "after": usage_summary(after, cfg.codebook_size),
            "kept_codes": kept.tolist(),
        }
    _write(out_dir, cfg, state, disc_state, disc_loss, summary)
    return summary


def _write(out_dir: Path, cfg, state, disc_state, disc_loss, summary) -> None:
    from safetensors.torch import save_file

    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SUMMARY_NAME).is_file():
        raise TokenizerImportError(
            f"--out {out_dir} exists and is not an import directory; refusing to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tokenizer(cfg, state).save_pretrained(tmp)
        if disc_state is not None:
            (tmp / "discriminator").mkdir()
            save_file(disc_state, str(tmp / "discriminator" / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "discriminator" / "config.json").write_text(
                json.dumps(
                    {
                        "component": "discriminator",
                        "disc_ndf": disc_loss.disc_ndf,
                        "disc_layers": disc_loss.disc_layers,
                        "disc_norm": "batch",
                        "in_channels": cfg.in_channels,
                    },
                    indent=1,
                )
            )
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def print_summary(summary: dict[str, Any], out_dir: str | Path) -> None:
    print(f"imported {summary['format']} tokenizer from {summary['source']} -> {out_dir}")
    print(
        f"  tensors: {summary['imported_tensors']} ours from {summary['source_keys_used']} source keys"
        f"{' (EMA weights)' if summary['ema'] else ''}"
    )
    for note in summary["notes"]:
        print(f"  note: {note}")
    print(f"  discriminator: {summary['discriminator']}")
    for reason, keys in summary["not_imported"].items():
        print(f"  not imported, {reason}: {len(keys)} keys, e.g. {keys[:3]}")
    if summary["checkpoint_entries_not_imported"]:
        print(f"  checkpoint entries not imported: {summary['checkpoint_entries_not_imported']}")
    if "codebook_resize" in summary:
        resize = summary["codebook_resize"]
        for when in ("before", "after"):
            u = resize[when]
            print(
                f"  codebook {when}: {u['codes_used']} of {u['codebook_size']} codes used, perplexity "
                f"{u['perplexity']:.1f} ({resize['images']} images at {resize['image_size']} px)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.import_tokenizer",
        description="Import a pretrained SEED-Voken IBQ, taming-transformers VQGAN or transformers JanusVQVAE "
        "tokenizer into our VQTokenizer directory (stage.init_tokenizer_from).",
    )
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--input", required=True, help="a Lightning .ckpt (seed-voken-ibq, taming) or a JanusVQVAE dir"
    )
    parser.add_argument(
        "--out", required=True, help="output directory (tokenizer_config.json + model.safetensors)"
    )
    parser.add_argument(
        "--config", default=None, help="model config YAML when the .ckpt has no hyper_parameters"
    )
    parser.add_argument("--ema", action="store_true", help="import the EMA weights (model_ema.*)")
    parser.add_argument("--codebook-size", type=int, default=None, help="keep the K most used codes")
    parser.add_argument(
        "--data", default=None, help="dataset directory (our Arrow format) or folder of images"
    )
    parser.add_argument("--data-samples", type=int, default=256, help="images to measure code usage on")
    parser.add_argument(
        "--image-size", type=int, default=None, help="sample image size (default: the resolution)"
    )
    parser.add_argument("--unsafe-pickle", action="store_true", help="torch.load without weights_only")
    args = parser.parse_args(argv)
    try:
        summary = import_tokenizer(
            args.format,
            args.input,
            args.out,
            args.config,
            args.ema,
            args.codebook_size,
            args.data,
            args.data_samples,
            args.image_size,
            args.unsafe_pickle,
        )
    except (ValueError, FileNotFoundError) as exc:  # TokenizerImportError is a ValueError
        print(f"import_tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
