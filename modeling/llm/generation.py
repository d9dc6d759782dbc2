"""Autoregressive decoding with a KV cache: greedy, or sampling with temperature / top-k / top-p."""

from __future__ import annotations

from collections.abc import Callable

import torch

from modeling.llm.attention import KVCache
from modeling.llm.model import DecoderLM
from modeling.sampling import sample

LogitsProcessor = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def generate(
    model: DecoderLM,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> torch.Tensor:
    """Continue a prompt of token ids [B, S] or of embeddings [B, S, C] (e.g. projected image embeddings
    scattered into text embeddings; all rows the same length, no padding) and return the new tokens
    LongTensor[B, n], n <= max_new_tokens.

    Each step: logits of the last position -> `logits_processor(step, logits)` (callers mask tokens, e.g. to
    the image grid) -> greedy argmax, or sampling from softmax(logits / temperature) restricted to the top_k
    tokens and to the smallest set whose probability reaches top_p. A row that produced `eos_token_id` keeps
    emitting it; decoding stops early once every row has.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    cache = KVCache(model.config.num_layers)
    output = model(input_ids=input_ids, inputs_embeds=inputs_embeds, kv_cache=cache)
    logits = output.logits[:, -1].float()
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    new_tokens = []
    for step in range(max_new_tokens):
        if logits_processor is not None:
            logits = logits_processor(step, logits)
        if do_sample:
            token = sample(logits / temperature, top_k, top_p, generator)
        else:
            token = logits.argmax(dim=-1)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        new_tokens.append(token)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = model(input_ids=token[:, None], kv_cache=cache).logits[:, -1].float()
    return torch.stack(new_tokens, dim=1)
