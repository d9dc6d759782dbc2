"""Inference from an export directory (training/export.py layout).

    python -m training.infer caption --export DIR --image PNG [--prompt TEXT] [--greedy | --temperature T
                                     [--top-k K] [--top-p P] --seed N] [--max-new-tokens N]
    python -m training.infer generate --export DIR --prompt TEXT --out PNG [--guidance-scale S] [--seed N]
                                      [--temperature T] [--top-k K] [--top-p P]
    python -m training.infer reconstruct --export DIR --image PNG --out PNG

Images are read as in training (data_pipeline.processing.decode_image: centre crop to the trained aspect, resize to
data.image_size of the export's run config, scale to [-1, 1]) and written as RGB PNGs.

Prompts are built by data_pipeline/layouts.py, the module that lays out the training samples, so inference sees
exactly the token sequences training saw.

caption   prefix = BOS, the image span (projected codebook embeddings at the placeholder positions), the optional
          prompt; a chat_sft export wraps it as BOS, USER, image, prompt, ASSISTANT. Decoding uses the LLM's KV
          cache (modeling.llm.generate) and stops at EOS.
generate  BOS, prompt, IMAGE_START, then an h x w grid of codes sampled with the visual head and classifier-free
          guidance (modeling/generation_t2i.py), decoded by the vision tokenizer.
reconstruct  vision tokenizer encode -> quantize -> decode.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.layouts import caption_prompt, t2i_prompt
from training.export import ExportError, load_handoff_state_dict, read_export_config, run_config_from_dict
from training.stages import STAGES


@dataclass
class LoadedExport:
    """An ETTModel (eval mode, fp32) with the parts the export holds, its text tokenizer and run config."""

    model: torch.nn.Module
    text_tokenizer: object | None
    config: object
    components: list[str]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.config.data.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        factor = self.config.model.tokenizer.downsample_factor
        return self.image_size[0] // factor, self.image_size[1] // factor

    def require(self, *components: str, command: str) -> None:
        missing = [c for c in components if c not in self.components]
        if missing:
            raise ExportError(
                f"`{command}` needs the export components {list(components)}; this export has {self.components} "
                f"(missing {missing})"
            )


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> LoadedExport:
    """Build the ETTModel of an export on the meta device and give it the exported tensors (fp32)."""
    from data_pipeline.text_tokenizer import TextTokenizer
    from modeling.tokenizer import VQTokenizer
    from training.stages import build_model

    export_dir = Path(export_dir)
    manifest = read_export_config(export_dir)
    cfg = run_config_from_dict(manifest["config"])
    components = list(manifest["components"])
    with torch.device("meta"):
        model = build_model(cfg)
    if hasattr(model, "tokenizer"):
        # The quantizer's non-persistent buffers (code ids) are not in the weights: build the (small) vision
        # tokenizer for real; its parameters are replaced by the exported ones below.
        model.tokenizer = VQTokenizer(cfg.model.tokenizer)
    state = {k: v.float() for k, v in load_handoff_state_dict(export_dir).items()}
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ExportError(
            f"{export_dir}: the exported weights lack {missing[:8]} (listed components {components})"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, assign=True, strict=True)
    model.to(device).eval()
    text_tokenizer = TextTokenizer.load(export_dir / "llm") if "llm" in components else None
    return LoadedExport(model, text_tokenizer, cfg, components)


def load_image(path: str | Path, image_size: tuple[int, int]) -> torch.Tensor:
    """An image file -> FloatTensor [1, 3, H, W] in [-1, 1], preprocessed as in training."""
    from data_pipeline.processing import SkipSample, decode_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        pixels = decode_image(path.read_bytes(), image_size)
    except SkipSample as exc:
        raise ValueError(f"image {path} cannot be decoded: {exc.detail}") from None
    return torch.from_numpy(pixels).float().div(127.5).sub(1.0)[None]


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """FloatTensor [3, H, W] in [-1, 1] -> RGB PNG (values rounded to uint8)."""
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels.numpy()), "RGB").save(path)
    return path


def _device_of(loaded: LoadedExport) -> torch.device:
    return next(loaded.model.parameters()).device


def caption_prompt_ids(loaded: LoadedExport, prompt: str | None = None) -> list[int]:
    """The token ids before the generated text (data_pipeline.layouts.caption_prompt): BOS, image span, prompt; a
    chat_sft export uses the chat layout BOS, USER, image span, prompt, ASSISTANT."""
    chat = STAGES[loaded.config.stage.kind].chat
    return caption_prompt(loaded.text_tokenizer, loaded.grid, prompt, chat=chat)


@torch.no_grad()
def caption_prefix(loaded: LoadedExport, image: torch.Tensor, prompt: str | None = None) -> torch.Tensor:
    """The captioning prefix (`caption_prompt_ids`) as input embeddings [1, S, C], with the projected image
    embeddings at the placeholder positions."""
    loaded.require("llm", "vision_tokenizer", command="caption")
    tok, model = loaded.text_tokenizer, loaded.model
    ids = caption_prompt_ids(loaded, prompt)
    device = _device_of(loaded)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    image_embeds, _ = model.image_embeddings(image.to(device))
    return model.input_embeddings(input_ids, input_ids == tok.image_placeholder_id, image_embeds)


@torch.no_grad()
def caption(
    loaded: LoadedExport,
    image: torch.Tensor,
    prompt: str | None = None,
    max_new_tokens: int = 32,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Caption one image [1, 3, H, W]; returns the generated token ids (without the final EOS)."""
    from modeling.llm import generate

    embeds = caption_prefix(loaded, image, prompt)
    generator = torch.Generator(device=embeds.device).manual_seed(seed)
    eos = loaded.text_tokenizer.eos_id
    tokens = generate(
        loaded.model.llm,
        inputs_embeds=embeds,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos,
        generator=generator,
    )[0].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def t2i_prompt_ids(loaded: LoadedExport, prompt: str) -> tuple[list[int], list[int]]:
    """(conditional BOS, prompt, IMAGE_START; unconditional BOS, IMAGE_START): data_pipeline.layouts.t2i_prompt,
    the t2i training layout up to the first image code (unconditional: the caption-dropped samples)."""
    tok, grid = loaded.text_tokenizer, loaded.grid
    return t2i_prompt(tok, grid, prompt), t2i_prompt(tok, grid, None)


def t2i_prompts(loaded: LoadedExport, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`t2i_prompt_ids` as LongTensors (conditional [1, S], unconditional [1, 2]) on the model's device."""
    cond, uncond = t2i_prompt_ids(loaded, prompt)
    device = _device_of(loaded)
    return (
        torch.tensor([cond], dtype=torch.long, device=device),
        torch.tensor([uncond], dtype=torch.long, device=device),
    )


@torch.no_grad()
def generate_image(
    loaded: LoadedExport,
    prompt: str,
    guidance_scale: float = 3.0,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3, H, W] in [-1, 1], codes [h, w]) for a text prompt. The same seed gives the same image."""
    from modeling.generation_t2i import T2ISamplingConfig, sample_image_codes

    loaded.require("llm", "vision_tokenizer", "visual_head", command="generate")
    cond, uncond = t2i_prompts(loaded, prompt)
    generator = torch.Generator(device=cond.device).manual_seed(seed)
    sampling = T2ISamplingConfig(guidance_scale, temperature, top_k, top_p)
    codes = sample_image_codes(
        loaded.model, cond, loaded.grid, loaded.text_tokenizer.row_end_id, sampling, uncond, generator
    )
    image = loaded.model.tokenizer.decode_indices(codes[None])[0]
    return image, codes


@torch.no_grad()
def reconstruct(loaded: LoadedExport, image: torch.Tensor) -> torch.Tensor:
    """image [1, 3, H, W] -> reconstruction [1, 3, H, W] through the vision tokenizer."""
    loaded.require("vision_tokenizer", command="reconstruct")
    return loaded.model.tokenizer.reconstruct(image.to(_device_of(loaded)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.infer",
        description="Caption an image, generate an image from text, or reconstruct an image, from an ETT export "
        "directory (python -m training.export, or a stage's final/ hand-off).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--export", required=True, help="export directory (holds ett_config.json)")
        sub.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")

    def sampling(sub: argparse.ArgumentParser, default_temperature: float) -> None:
        sub.add_argument("--temperature", type=float, default=default_temperature)
        sub.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
        sub.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
        sub.add_argument("--seed", type=int, default=0)

    cap = commands.add_parser("caption", help="describe an image (text generation with a KV cache)")
    common(cap)
    cap.add_argument("--image", required=True)
    cap.add_argument("--prompt", default=None, help="text after the image (a question for chat models)")
    cap.add_argument("--greedy", action="store_true", help="argmax decoding (default when no --temperature)")
    cap.add_argument("--max-new-tokens", type=int, default=32)
    sampling(cap, default_temperature=0.0)

    gen = commands.add_parser("generate", help="text-to-image with the visual head")
    common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output PNG")
    gen.add_argument(
        "--guidance-scale", type=float, default=3.0, help="classifier-free guidance; 1 disables it"
    )
    sampling(gen, default_temperature=1.0)

    rec = commands.add_parser("reconstruct", help="encode and decode an image with the vision tokenizer")
    common(rec)
    rec.add_argument("--image", required=True)
    rec.add_argument("--out", required=True, help="output PNG")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_export(args.export, args.device)
        if args.command == "caption":
            image = load_image(args.image, loaded.image_size)
            greedy = args.greedy or args.temperature <= 0
            tokens = caption(
                loaded,
                image,
                args.prompt,
                args.max_new_tokens,
                greedy,
                args.temperature if not greedy else 1.0,
                args.top_k,
                args.top_p,
                args.seed,
            )
            print(loaded.text_tokenizer.decode(tokens))
        elif args.command == "generate":
            image, _ = generate_image(
                loaded, args.prompt, args.guidance_scale, args.seed, args.temperature, args.top_k, args.top_p
            )
            print(f"wrote {save_image(image, args.out)}")
        else:
            reconstruction = reconstruct(loaded, load_image(args.image, loaded.image_size))
            print(f"wrote {save_image(reconstruction[0], args.out)}")
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
