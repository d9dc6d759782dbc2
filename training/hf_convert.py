"""The Hugging Face adapter of our LLM: exact weight conversion between DecoderLM and transformers' Qwen2 / Llama
directories, both directions. `read_hf_llm` / `load_hf_llm` read (training.hf_import, and hand-offs that point at
a transformers directory); `write_hf_llm` writes (training.export, every stage's hand-off).

One declarative table (`LAYER_MAP`, `GLOBAL_MAP`) lists every tensor: our (Megatron) name, the HF names it is
made of, and how they fuse:
- "qkv": Megatron's fused QKV is interleaved per query group, [q heads of group g, k_g, v_g] for g = 0..H_kv-1;
  HF keeps q_proj, k_proj, v_proj apart.
- "concat": linear_fc1 = [gate_proj; up_proj] stacked on the output dim.
- "copy": same tensor, other name. Both follow the rotate-half RoPE convention, so q/k need no permutation.
Tied embeddings: transformers writes no `lm_head.weight` when `tie_word_embeddings` is true and ties it on load;
we do the same (an `lm_head.weight` found in a tied checkpoint is ignored). Untied, `output_layer.weight` <->
`lm_head.weight`.

Reading accepts model.safetensors, pytorch_model.bin, or either sharded with its `*.index.json`, one tensor at a
time. Writing streams too: it converts one tensor at a time (the source may be DeepSpeed's lazy GatheredTensors)
and writes each safetensors shard as soon as it is full, sharded by `max_shard_size` with a transformers-style
index, plus config.json from transformers' own config class, so `AutoModelForCausalLM.from_pretrained(out_dir)`
loads it with no custom code. Qwen2 always has a QKV bias and Llama never (as transformers builds them): qkv_bias
selects the export class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling.llm import DecoderLM, LLMConfig

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# HF tensors that carry no weights of ours (old checkpoints store the RoPE table).
IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class TensorMapping:
    ours: str
    hf: tuple[str, ...]
    fusion: str = "copy"


LAYER_MAP: tuple[TensorMapping, ...] = (
    TensorMapping("input_layernorm.weight", ("input_layernorm.weight",)),
    TensorMapping(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    TensorMapping(
        "self_attention.linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
    ),
    TensorMapping("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    TensorMapping("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    TensorMapping("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "concat"),
    TensorMapping("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
)
GLOBAL_MAP: tuple[TensorMapping, ...] = (
    TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    TensorMapping("output_layer.weight", ("lm_head.weight",)),
)


def tensor_mappings(config: LLMConfig) -> list[TensorMapping]:
    """Every tensor of a model with this config, with full names on both sides."""
    mappings = []
    for i in range(config.num_layers):
        for m in LAYER_MAP:
            if m.ours.endswith("linear_qkv.bias") and not config.qkv_bias:
                continue
            hf = tuple(f"model.layers.{i}.{name}" for name in m.hf)
            mappings.append(TensorMapping(f"decoder.layers.{i}.{m.ours}", hf, m.fusion))
    for m in GLOBAL_MAP:
        if m.ours == "output_layer.weight" and config.tie_embeddings:
            continue
        mappings.append(m)
    return mappings


def hf_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor of a model with this config."""
    c, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    per_layer = {
        "input_layernorm.weight": (c,),
        "post_attention_layernorm.weight": (c,),
        "self_attn.q_proj.weight": (q, c),
        "self_attn.k_proj.weight": (kv, c),
        "self_attn.v_proj.weight": (kv, c),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (c, q),
        "mlp.gate_proj.weight": (inter, c),
        "mlp.up_proj.weight": (inter, c),
        "mlp.down_proj.weight": (c, inter),
    }
    shapes = {f"model.layers.{i}.{k}": v for i in range(config.num_layers) for k, v in per_layer.items()}
    shapes.update(
        {
            "model.embed_tokens.weight": (config.vocab_size, c),
            "model.norm.weight": (c,),
            "lm_head.weight": (config.vocab_size, c),
        }
    )
    return shapes


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: LLMConfig) -> torch.Tensor:
    """q [H d, ...], k/v [H_kv d, ...] -> [(H + 2 H_kv) d, ...] laid out per group as [q_g, k_g, v_g]."""
    groups, rest = config.num_kv_heads, q.shape[1:]
    parts = (q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, config: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    groups, d, rest = config.num_kv_heads, config.head_dim, qkv.shape[1:]
    q_per_group = config.num_heads // groups * d
    q, k, v = qkv.reshape(groups, -1, *rest).split([q_per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def to_ours(mapping: TensorMapping, tensors: list[torch.Tensor], config: LLMConfig) -> torch.Tensor:
    if mapping.fusion == "qkv":
        return fuse_qkv(*tensors, config)
    if mapping.fusion == "concat":
        return torch.cat(tensors, dim=0)
    return tensors[0]


def to_hf(mapping: TensorMapping, tensor: torch.Tensor, config: LLMConfig) -> list[torch.Tensor]:
    if mapping.fusion == "qkv":
        return list(split_qkv(tensor, config))
    if mapping.fusion == "concat":
        return list(tensor.chunk(2, dim=0))
    return [tensor]


# ---- config ---------------------------------------------------------------------------------------------------


def llm_config_from_hf(hf_config: dict, source: str = "config.json") -> LLMConfig:
    """transformers config.json (Qwen2 or Llama; rope_theta at top level or in rope_parameters) -> LLMConfig.
    Raises ValueError naming `source` and the field for anything our decoder does not implement."""
    archs = hf_config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    model_type = hf_config.get("model_type")
    if arch is None and model_type not in ARCHITECTURES.values():
        raise ValueError(
            f"{source}: unsupported architecture {archs or model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    model_type = ARCHITECTURES.get(arch, model_type)

    def field(name: str, default=None):
        value = hf_config.get(name, default)
        if value is None:
            raise ValueError(f"{source}: missing field {name!r}")
        return value

    heads = field("num_attention_heads")
    hidden = field("hidden_size")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = {
        "hidden_act": (hf_config.get("hidden_act", "silu"), "silu"),
        "rope_parameters.rope_type": (rope_type, "default"),
        "head_dim": (hf_config.get("head_dim") or hidden // heads, hidden // heads),
        "mlp_bias": (hf_config.get("mlp_bias", False), False),
        "use_sliding_window": (hf_config.get("use_sliding_window", False), False),
    }
    if model_type == "llama":
        checks["attention_bias"] = (hf_config.get("attention_bias", False), False)
    for name, (value, supported) in checks.items():
        if value != supported:
            raise ValueError(f"{source}: {name}={value!r} is not supported (only {supported!r})")
    rope_theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    return LLMConfig(
        vocab_size=field("vocab_size"),
        hidden_size=hidden,
        num_layers=field("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        intermediate_size=field("intermediate_size"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
        max_position_embeddings=field("max_position_embeddings", 4096),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )


def hf_config_from_llm(
    config: LLMConfig, dtype: torch.dtype, special_ids: dict[str, int | None] | None = None
):
    """LLMConfig -> transformers Qwen2Config (qkv_bias) or LlamaConfig (no bias)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.init_std,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        **(special_ids or {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}),
    )
    if config.qkv_bias:
        hf_config = Qwen2Config(**common)
        hf_config.architectures = ["Qwen2ForCausalLM"]
    else:
        hf_config = LlamaConfig(attention_bias=False, mlp_bias=False, head_dim=config.head_dim, **common)
        hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = str(dtype).removeprefix("torch.")
    return hf_config


# ---- reading --------------------------------------------------------------------------------------------------


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it. Missing shards raise FileNotFoundError naming shard and tensors."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = hf_dir / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            for shard in sorted(set(weight_map.values())):
                if not (hf_dir / shard).is_file():
                    held = sorted(name for name, file in weight_map.items() if file == shard)
                    raise FileNotFoundError(
                        f"{index_path} lists shard {hf_dir / shard}, which is missing; it holds {len(held)} tensors "
                        f"(e.g. {held[0]})"
                    )
            return {name: hf_dir / file for name, file in weight_map.items()}
    for file_name in (SAFETENSORS_FILE, BIN_FILE):
        path = hf_dir / file_name
        if path.is_file():
            return {name: path for name in _tensor_names(path)}
    raise FileNotFoundError(
        f"{hf_dir}: no weights found; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX}"
    )


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(_load_bin(path))


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


class _TensorReader:
    """Reads HF tensors by name, opening each file once."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._open: dict[Path, Callable[[str], torch.Tensor]] = {}

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._open:
            if path.suffix == ".safetensors":
                handle = safe_open(str(path), framework="pt")
                self._open[path] = handle.get_tensor
            else:
                self._open[path] = _load_bin(path).__getitem__
        try:
            return self._open[path](name)
        except KeyError:
            raise ValueError(f"{path}: the index says it holds tensor {name}, but it does not") from None


def read_hf_llm(
    hf_dir: str | Path, dtype: torch.dtype | None = torch.float32
) -> tuple[dict[str, torch.Tensor], LLMConfig]:
    """A transformers Qwen2 / Llama directory -> (DecoderLM state dict, LLMConfig), read one tensor at a time.
    dtype None keeps the checkpoint's. Errors name the file and the tensor."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a transformers model directory)")
    config = llm_config_from_hf(json.loads(config_path.read_text()), source=str(config_path))
    reader = _TensorReader(_weight_files(hf_dir))
    shapes = hf_shapes(config)
    state_dict, used = {}, set()
    for mapping in tensor_mappings(config):
        tensors = []
        for name in mapping.hf:
            if name not in reader.files:
                raise ValueError(f"{hf_dir}: tensor {name} is missing (needed for {mapping.ours})")
            tensor = reader.get(name)
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"{reader.files[name]}: tensor {name} has shape {tuple(tensor.shape)}, expected {shapes[name]} "
                    f"from {config_path}"
                )
            tensors.append(tensor if dtype is None else tensor.to(dtype))
            used.add(name)
        state_dict[mapping.ours] = to_ours(mapping, tensors, config)
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    unknown = sorted(n for n in reader.files if n not in used | ignorable and not IGNORED_HF_TENSORS.match(n))
    if unknown:
        raise ValueError(
            f"{hf_dir}: tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} (in {reader.files[unknown[0]]}) "
            "have no place in a Qwen2/Llama decoder with this config.json"
        )
    return state_dict, config


def load_hf_llm(hf_dir: str | Path, dtype: torch.dtype | None = torch.float32) -> tuple[DecoderLM, LLMConfig]:
    """A transformers Qwen2 / Llama directory -> (DecoderLM, LLMConfig). dtype None keeps the checkpoint's."""
    state_dict, config = read_hf_llm(hf_dir, dtype)
    return DecoderLM.from_state_dict(config, state_dict, source=str(hf_dir)), config


# ---- writing --------------------------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '64KB' / bytes -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if match is None:
        raise ValueError(f"max_shard_size must look like '5GB', '500MB', '64KB' or be an int, got {size!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _materialize(tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor or one of DeepSpeed's lazy GatheredTensors -> a CPU tensor of `dtype` that owns its memory
    (safetensors refuses tensors that share storage)."""
    return tensor.contiguous().detach().cpu().to(dtype).clone()


def write_hf_llm(
    state: Mapping[str, torch.Tensor],
    llm_config: LLMConfig,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    text_tokenizer=None,
) -> Path:
    """Write our LLM tensors (names of DecoderLM.state_dict; tensors or lazy GatheredTensors) as a new transformers
    model directory `out_dir`: config.json, generation_config.json and model.safetensors, or shards
    model-00001-of-0000n.safetensors + model.safetensors.index.json (transformers' names and greedy rule). Each
    tensor is converted when its turn comes and each shard written as soon as it is full, so at most one shard is
    held in memory. `dtype`: of the written weights (None: fp32). `text_tokenizer`: an object with `save(dir)`,
    `encode(text)` and bos_id / eos_id / pad_id (data_pipeline.text_tokenizer.TextTokenizer); its files go into
    `out_dir` and its special ids into the config, and a warning is logged when transformers' AutoTokenizer would
    load it as a tokenizer that encodes differently."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    mappings = tensor_mappings(llm_config)
    missing = [m.ours for m in mappings if m.ours not in state]
    if missing:
        raise ValueError(f"the LLM weights lack {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    out_dtype = dtype or torch.float32
    item_size = torch.empty((), dtype=out_dtype).element_size()
    shapes = hf_shapes(llm_config)
    max_bytes = parse_size(max_shard_size)
    # Plan the shards from the shapes alone (same greedy rule as transformers), so each shard is written once.
    shard_of: dict[str, int] = {}
    shard_bytes, shard = 0, 0
    for mapping in mappings:
        for name in mapping.hf:
            size = item_size * int(torch.Size(shapes[name]).numel())
            if shard_bytes and shard_bytes + size > max_bytes:
                shard, shard_bytes = shard + 1, 0
            shard_of[name] = shard
            shard_bytes += size
    num_shards = shard + 1

    def file_name(index: int) -> str:
        return (
            SAFETENSORS_FILE if num_shards == 1 else f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        )

    out_dir.mkdir(parents=True)
    pending: dict[str, torch.Tensor] = {}
    current, total = 0, 0
    for mapping in mappings:
        source = state[mapping.ours].contiguous()
        for name, tensor in zip(mapping.hf, to_hf(mapping, source, llm_config)):
            if shard_of[name] != current:
                save_file(pending, str(out_dir / file_name(current)), metadata={"format": "pt"})
                pending, current = {}, shard_of[name]
            pending[name] = _materialize(tensor, out_dtype)
            total += pending[name].numel() * item_size
        del source
    save_file(pending, str(out_dir / file_name(current)), metadata={"format": "pt"})
    if num_shards > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: file_name(i) for name, i in shard_of.items()},
        }
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    special_ids = None
    if text_tokenizer is not None:
        text_tokenizer.save(out_dir)
        special_ids = {
            "bos_token_id": text_tokenizer.bos_id,
            "eos_token_id": text_tokenizer.eos_id,
            "pad_token_id": text_tokenizer.pad_id,
        }
    hf_config = hf_config_from_llm(llm_config, out_dtype, special_ids)
    hf_config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(hf_config).save_pretrained(str(out_dir))
    if text_tokenizer is not None:
        _check_auto_tokenizer(out_dir, text_tokenizer)
    return out_dir


def _check_auto_tokenizer(llm_dir: Path, text_tokenizer) -> None:
    """Warn when transformers' AutoTokenizer would not reproduce our tokenizer from llm/: transformers 5 maps some
    model types (qwen2 among them) to their own tokenizer class whatever tokenizer_config.json says, and that class
    rebuilds the pipeline from a byte-level BPE vocabulary, so a sentencepiece tokenizer comes out wrong."""
    from transformers import AutoTokenizer

    from training.run_log import get_logger

    probe = "The quick brown fox jumps over 13 lazy dogs."
    auto = AutoTokenizer.from_pretrained(str(llm_dir))
    if auto.encode(probe, add_special_tokens=False) != text_tokenizer.encode(probe):
        get_logger().warning(
            f"{llm_dir}: AutoTokenizer.from_pretrained loads this text tokenizer as {type(auto).__name__}, which "
            "encodes differently (transformers picks it from config.json's model_type); load it with "
            "transformers.PreTrainedTokenizerFast.from_pretrained, or train with model.llm.qkv_bias=false "
            "(a Llama-type export, for which AutoTokenizer honours tokenizer.json)"
        )
