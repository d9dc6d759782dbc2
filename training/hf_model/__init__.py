"""The whole ETT model as a transformers multimodal model at the top level of an export (training/export.py).

`write_hf_model` adds, next to ett_config.json, llm/, vision_tokenizer/, projector/ ... (which stay as they are):

  config.json                    ETTConfig (configuration_ett.py) with auto_map for AutoConfig, AutoModel,
                                 AutoModelForImageTextToText and AutoProcessor; dtype is the export's
  model.safetensors.index.json   language_model-*.safetensors (llm/'s tensors, names prefixed
                                 "language_model.", in files of at most 128 MiB) and vision.safetensors
                                 (vision_tokenizer.*, projector.* or index_embedding.*, visual_head.*); the
                                 vision tokenizer stays fp32
  configuration_ett.py modeling_ett.py processing_ett.py    this package's files
  tokenizer.py config.py encoder_decoder.py quantizers.py   modeling/tokenizer/ (inference needs these four)
  kernels.py reference.py        modeling/kernels/__init__.py and reference.py (the torch path of the codebook ops)
  projector.py sampling.py       modeling/projector.py, modeling/sampling.py
  tokenizer.json tokenizer_config.json chat_template.jinja processor_config.json preprocessor_config.json
  generation_config.json

The remote code imports only torch and transformers and the files above (relative imports, which transformers'
dynamic-module loader copies along). The image span and the prompt layouts come from data_pipeline/layouts.py at
export time: `image_span` (the ids of one image) goes into processor_config.json and the chat template is checked
against `caption_prompt` before it is written. docs/hf_export.md shows the calls.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent.parent
REMOTE_CODE = {
    "configuration_ett.py": PACKAGE_DIR / "configuration_ett.py",
    "modeling_ett.py": PACKAGE_DIR / "modeling_ett.py",
    "processing_ett.py": PACKAGE_DIR / "processing_ett.py",
    "tokenizer.py": REPO_DIR / "modeling" / "tokenizer" / "tokenizer.py",
    "config.py": REPO_DIR / "modeling" / "tokenizer" / "config.py",
    "encoder_decoder.py": REPO_DIR / "modeling" / "tokenizer" / "encoder_decoder.py",
    "quantizers.py": REPO_DIR / "modeling" / "tokenizer" / "quantizers.py",
    "kernels.py": REPO_DIR / "modeling" / "kernels" / "__init__.py",
    "reference.py": REPO_DIR / "modeling" / "kernels" / "reference.py",
    "projector.py": REPO_DIR / "modeling" / "projector.py",
    "sampling.py": REPO_DIR / "modeling" / "sampling.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_ett.ETTConfig",
    "AutoModel": "modeling_ett.ETTForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_ett.ETTForConditionalGeneration",
    "AutoProcessor": "processing_ett.ETTProcessor",
}
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_ett.ETTImageProcessor",
    "AutoProcessor": "processing_ett.ETTProcessor",
}
HF_COMPONENTS = ("llm", "vision_tokenizer")
VISION_COMPONENTS = ("vision_tokenizer", "projector", "index_embedding", "visual_head")
VISION_WEIGHTS = "vision.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def chat_template(chat: bool) -> str:
    """The jinja chat template of the training layout (data_pipeline/layouts.py): caption stages read BOS, then
    every message's images and text in order; chat stages BOS, then per turn the role token (USER / ASSISTANT;
    other roles count as user) and its content, an assistant turn closed by EOS, and with add_generation_prompt
    a final ASSISTANT. Each image is one IMAGE_PLACEHOLDER string, expanded to its span by ETTProcessor."""
    from data_pipeline.text_tokenizer import ASSISTANT, BOS, EOS, IMAGE_PLACEHOLDER, USER

    content = (
        "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
        "{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{IMAGE_PLACEHOLDER}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    if not chat:
        return BOS + "{%- for message in messages -%}" + content + "{%- endfor -%}"
    return (
        BOS + "{%- set ns = namespace(role=none) -%}{%- for message in messages -%}"
        "{%- set role = 'assistant' if message['role'] == 'assistant' else 'user' -%}"
        "{%- if role != ns.role -%}"
        f"{{%- if ns.role == 'assistant' -%}}{EOS}{{%- endif -%}}"
        f"{{%- if role == 'assistant' -%}}{ASSISTANT}{{%- else -%}}{USER}{{%- endif -%}}"
        "{%- set ns.role = role -%}{%- endif -%}" + content + "{%- endfor -%}"
        f"{{%- if ns.role == 'assistant' -%}}{EOS}{{%- endif -%}}"
        f"{{%- if add_generation_prompt -%}}{ASSISTANT}{{%- endif -%}}"
    )


def _llm_weight_files(llm_dir: Path) -> list[Path]:
    index = llm_dir / INDEX_FILE
    if index.is_file():
        return [llm_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [llm_dir / "model.safetensors"]


COPY_PIECE_BYTES = 128 * 2**20


def _write_weights(export_dir: Path, components: list[str]) -> None:
    """The top-level weights: llm/'s tensors renamed, read lazily and written in files of at most COPY_PIECE_BYTES
    (so the copy adds at most that much memory to the export's bound), then the other parts in one file."""
    weight_map, piece = {}, {}

    def flush() -> None:
        name = f"language_model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(piece, str(export_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(piece, name))
        piece.clear()

    for source in _llm_weight_files(export_dir / "llm"):
        with safe_open(str(source), framework="pt") as reader:
            for key in reader.keys():
                tensor = reader.get_tensor(key)
                if piece and sum(t.nbytes for t in piece.values()) + tensor.nbytes > COPY_PIECE_BYTES:
                    flush()
                piece[f"language_model.{key}"] = tensor
    if piece:
        flush()
    vision = {}
    for component in VISION_COMPONENTS:
        if component in components:
            weights = load_file(str(export_dir / component / "model.safetensors"))
            vision.update({f"{component}.{k}": v for k, v in weights.items()})
    save_file(vision, str(export_dir / VISION_WEIGHTS), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(vision, VISION_WEIGHTS))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (export_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_model(
    export_dir: Path, cfg, components: list[str], text_tokenizer, dtype: torch.dtype | None
) -> bool:
    """Add the top-level transformers model to `export_dir`, an export being written whose llm/,
    vision_tokenizer/, projector/ (or index_embedding/) and visual_head/ are in place. Returns False (and writes
    nothing) when the export has no LLM, no vision tokenizer or no text tokenizer: llm/ alone is then the
    transformers model."""
    from data_pipeline.layouts import caption_prompt, image_grid, image_span, t2i_prompt
    from data_pipeline.text_tokenizer import BOS, IMAGE_PLACEHOLDER, IMAGE_START, SPECIAL_TOKENS
    from training.hf_model.configuration_ett import ETTConfig
    from training.hf_model.processing_ett import ETTImageProcessor, ETTProcessor
    from training.stages import STAGES

    if text_tokenizer is None or any(c not in components for c in HF_COMPONENTS):
        return False
    tok = text_tokenizer
    grid = image_grid(tuple(cfg.data.image_size), cfg.model.tokenizer.downsample_factor)
    chat = STAGES[cfg.stage.kind].chat
    for name, source in REMOTE_CODE.items():
        shutil.copyfile(source, export_dir / name)
    tok.save(export_dir)
    processor = ETTProcessor(
        ETTImageProcessor(image_size=cfg.data.image_size),
        _hf_tokenizer(export_dir),
        chat_template=chat_template(chat),
        image_span=image_span(tok, grid),
        image_token=IMAGE_PLACEHOLDER,
        special_tokens=SPECIAL_TOKENS,
        t2i_prompt_format=BOS + "{prompt}" + IMAGE_START,
        t2i_unconditional=BOS + IMAGE_START,
    )
    _check_layouts(processor, tok, grid, chat, caption_prompt, t2i_prompt)
    processor.save_pretrained(str(export_dir))
    image_config = {**processor.image_processor.to_dict(), "auto_map": PROCESSOR_AUTO_MAP}
    processor_config = json.loads((export_dir / "processor_config.json").read_text())
    processor_config.update(image_processor=image_config, auto_map=PROCESSOR_AUTO_MAP)
    for name, data in (
        ("processor_config.json", processor_config),
        ("preprocessor_config.json", image_config),
    ):
        (export_dir / name).write_text(json.dumps(data, indent=2) + "\n")
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    config = ETTConfig(
        text_config=json.loads((export_dir / "llm" / "config.json").read_text()),
        vision_config=cfg.model.tokenizer.to_dict(),
        visual_input=cfg.model.ett.visual_input,
        projector_depth=cfg.model.projector.depth,
        visual_head="visual_head" in components,
        image_size=cfg.data.image_size,
        grid=grid,
        image_token_id=tok.image_placeholder_id,
        image_start_id=tok.image_start_id,
        row_end_id=tok.row_end_id,
        image_end_id=tok.image_end_id,
        tie_word_embeddings=False,
        **special,
    )
    config.architectures = ["ETTForConditionalGeneration"]
    config.auto_map = AUTO_MAP
    config.dtype = str(dtype or torch.float32).removeprefix("torch.")
    config.save_pretrained(str(export_dir))
    from transformers import GenerationConfig

    GenerationConfig(**special).save_pretrained(str(export_dir))
    _write_weights(export_dir, components)
    return True


def _hf_tokenizer(directory: Path):
    """The text tokenizer as transformers' generic fast tokenizer (what AutoTokenizer gives for the top-level
    tokenizer_config.json; see training/hf_convert._check_auto_tokenizer for llm/)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def _check_layouts(processor, tok, grid, chat: bool, caption_prompt, t2i_prompt) -> None:
    """The processor's ids for a probe conversation and t2i prompt must be data_pipeline/layouts.py's."""
    from data_pipeline.text_tokenizer import IMAGE_PLACEHOLDER

    probe = "two green glyphs"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    checks = {
        "chat template": (processor.encode_text(rendered)[0], caption_prompt(tok, grid, probe, chat=chat)),
        "t2i prompt": (
            processor.text_to_image_inputs(probe)["input_ids"][0].tolist(),
            t2i_prompt(tok, grid, probe),
        ),
        "t2i unconditional": (
            processor.text_to_image_inputs(probe)["unconditional_ids"][0].tolist(),
            t2i_prompt(tok, grid, None),
        ),
    }
    for name, (ours, layout) in checks.items():
        if ours != layout:
            raise RuntimeError(
                f"the exported processor's {name} gives {ours}, data_pipeline/layouts.py {layout} "
                f"(rendered {rendered!r}, image token {IMAGE_PLACEHOLDER})"
            )
