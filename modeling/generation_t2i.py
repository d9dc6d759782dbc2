"""Text-to-image sampling with the visual head: grid-constrained, KV-cached, classifier-free guidance.

The sequence the model was trained on (data_pipeline/processing.py, task t2i) is

    BOS, caption, IMAGE_START, (code x w, ROW_END) x h, IMAGE_END

and the visual head reads the hidden state at every position whose next token is a code: IMAGE_START, each code
but the last of its row, and each ROW_END. Sampling walks that grid: h rows of w codes, each sampled from the
visual head's K logits, fed back through `ETTModel.embed_codes` (projector(codebook[code]) for the ETT
embedding input), with ROW_END fed after every row. The image ends with IMAGE_END after the last row, which needs
no forward pass.

Classifier-free guidance (Emu3 / LlamaGen style; the unconditional context is the caption-dropped prompt
BOS, IMAGE_START that t2i training sees with probability data.caption_dropout):

    logits = logits_uncond + s * (logits_cond - logits_uncond)

Guidance scale 1 is the conditional model alone and runs no unconditional pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling.llm import KVCache
from modeling.sampling import sample


@dataclass
class T2ISamplingConfig:
    """guidance_scale s >= 1 (1: no guidance); temperature > 0; top_k 0 keeps all K codes; top_p 1 keeps all."""

    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class _Context:
    """One prompt's KV cache and the hidden state of its last position [1, C]."""

    def __init__(self, model, input_ids: torch.Tensor) -> None:
        self.model = model
        self.cache = KVCache(model.llm.config.num_layers)
        self.hidden = self._run(input_ids=input_ids)

    def _run(self, **inputs) -> torch.Tensor:
        return self.model.llm(**inputs, kv_cache=self.cache).hidden_states[:, -1]

    def feed_code(self, code: torch.Tensor) -> None:
        """code [1] -> its LLM-space embedding (embed_codes reads [B, h, w] grids) -> next hidden state."""
        self.hidden = self._run(inputs_embeds=self.model.embed_codes(code.view(1, 1, 1)).view(1, 1, -1))

    def feed_token(self, token_id: int) -> None:
        ids = torch.full((1, 1), token_id, dtype=torch.long, device=self.hidden.device)
        self.hidden = self._run(input_ids=ids)

    def code_logits(self) -> torch.Tensor:
        return self.model.visual_head(self.hidden).float()


@torch.no_grad()
def sample_image_codes(
    model,
    prompt_ids: torch.Tensor,
    grid: tuple[int, int],
    row_end_id: int,
    sampling: T2ISamplingConfig,
    unconditional_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample an h x w grid of code ids for one prompt.

    model: an ETTModel with a visual head. prompt_ids [1, S]: BOS, caption, IMAGE_START. unconditional_ids
    [1, S']: BOS, IMAGE_START (required when guidance_scale != 1). Returns LongTensor [h, w] in [0, K).
    """
    sampling.validate()
    if not hasattr(model, "visual_head"):
        raise ValueError(
            "the model has no visual head (train a t2i stage, or set model.ett.visual_head=true)"
        )
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be [1, S], got shape {tuple(prompt_ids.shape)}")
    guided = sampling.guidance_scale != 1.0
    if guided and unconditional_ids is None:
        raise ValueError(
            f"guidance_scale={sampling.guidance_scale} needs unconditional_ids (BOS, IMAGE_START)"
        )
    height, width = grid
    contexts = [_Context(model, prompt_ids)]
    if guided:
        contexts.append(_Context(model, unconditional_ids))
    codes = torch.empty(height, width, dtype=torch.long, device=prompt_ids.device)
    for row in range(height):
        for col in range(width):
            logits = contexts[0].code_logits()
            if guided:
                uncond = contexts[1].code_logits()
                logits = uncond + sampling.guidance_scale * (logits - uncond)
            code = sample(logits / sampling.temperature, sampling.top_k, sampling.top_p, generator)
            codes[row, col] = code[0]
            if (row, col) != (height - 1, width - 1):
                for context in contexts:
                    context.feed_code(code)
        if row + 1 < height:
            for context in contexts:
                context.feed_token(row_end_id)
    return codes
