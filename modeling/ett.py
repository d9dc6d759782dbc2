"""ETTModel: VQ tokenizer + projector + decoder LLM (+ visual head for generation), [ETT] §3.

Visual input (one of):
  embedding (ETT): images -> encoder -> IBQ straight-through codebook embeddings z_q -> projector -> LLM inputs.
                   The caption loss reaches the projector, the codebook (all rows, through IBQ's soft path) and
                   the encoder.
  index (Emu3-style baseline): frozen tokenizer indices -> a new learned embedding table (K x C) -> LLM inputs.

Objectives by stage kind (`forward(batch, kind=...)`):
  tokenizer     L_vq (Eq. 1) only: stage-0 tokenizer pretraining.
  llm_pretrain  next-token CE on text.
  align, ett, chat_sft
                L = L_cap + alpha * L_vq (Eq. 3); L_vq is computed only while the tokenizer trains and alpha > 0.
  t2i           CE of the visual head over the K code ids at the image positions (the tokenizer is frozen).
Every loss term is returned separately (detached) for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modeling.layers import NormalInitEmbedding, NormalInitLinear
from modeling.llm import DecoderLM, LLMConfig
from modeling.projector import Projector, ProjectorConfig
from modeling.tokenizer import TokenizerConfig, TokenizerOutput, VQLoss, VQTokenizer


@dataclass
class ETTConfig:
    visual_input: Literal["embedding", "index"] = "embedding"
    alpha: float = 0.25
    train_tokenizer: bool = True
    train_discriminator: bool = True
    visual_head: bool = False


class ETTOutput(NamedTuple):
    """The total loss, every term (detached, for logging), the detached reconstruction when L_vq ran (for the
    discriminator update), and caption token accuracy counts. A NamedTuple so that DeepSpeed ZeRO-3 sees its
    tensors."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    reconstruction: torch.Tensor | None = None
    token_correct: torch.Tensor | None = None
    token_count: torch.Tensor | None = None


class ETTModel(nn.Module):
    def __init__(
        self,
        llm_config: LLMConfig,
        tokenizer_config: TokenizerConfig,
        projector_config: ProjectorConfig,
        ett_config: ETTConfig,
        with_llm: bool = True,
        with_tokenizer: bool = True,
    ) -> None:
        """`with_llm=False` builds the tokenizer alone (stage 0); `with_tokenizer=False` the LLM alone (text
        pretraining)."""
        super().__init__()
        self.config = ett_config
        if with_tokenizer:
            self.tokenizer = VQTokenizer(tokenizer_config)
            self.vq_loss = VQLoss(tokenizer_config)
        if not with_llm:
            return
        self.llm = DecoderLM(llm_config)
        if not with_tokenizer:
            return
        hidden, code_dim, codes = (
            llm_config.hidden_size,
            tokenizer_config.code_dim,
            tokenizer_config.codebook_size,
        )
        if ett_config.visual_input == "embedding":
            self.projector = Projector(projector_config, code_dim, hidden)
        else:
            self.index_embedding = NormalInitEmbedding(codes, hidden, llm_config.init_std)
        if ett_config.visual_head:
            self.visual_head = NormalInitLinear(hidden, codes, False, llm_config.init_std)

    # ---- visual path -------------------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor, with_tokenizer_terms: bool):
        """images [M, 3, H, W] -> (LLM-space embeddings [M*h*w, C] in row-major order, tokenizer output parts)."""
        if self.config.visual_input == "index":
            with torch.no_grad():
                indices = self.tokenizer.encode(images)
            return self.index_embedding(indices.flatten()), None
        quantized, indices, quant_losses, stats = self.tokenizer.quantize_images(images)
        codes = quantized.permute(0, 2, 3, 1).reshape(-1, quantized.shape[1])
        parts = (quantized, indices, quant_losses, stats) if with_tokenizer_terms else None
        return self.projector(codes), parts

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids [...] -> LLM-space embeddings [..., C] (used by generation to feed sampled codes back)."""
        if self.config.visual_input == "index":
            return self.index_embedding(indices)
        return self.projector(self.tokenizer.embed(indices))

    def input_embeddings(self, input_ids, image_mask, image_embeds):
        """Scatter the image embeddings into the text embeddings at the placeholder positions."""
        embeds = self.llm.embed_tokens(input_ids)
        if image_embeds is None:
            return embeds
        expected = int(image_mask.sum())
        if image_embeds.shape[0] != expected:
            raise ValueError(
                f"batch has {expected} image placeholder positions but the images give {image_embeds.shape[0]} "
                "tokens: the image size and the placeholder spans disagree"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))

    # ---- objectives --------------------------------------------------------------------------------------------
    def forward(
        self, batch: dict, kind: str = "ett", discriminator: nn.Module | None = None, step: int = 0
    ) -> ETTOutput:
        if kind == "tokenizer":
            return self._tokenizer_objective(batch["images"], discriminator, step)
        if kind == "llm_pretrain":
            hidden = self.llm(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                segment_ids=batch["segment_ids"],
            )
            return self._text_objective(hidden.logits, batch["labels"], {})
        train_tok = self.config.train_tokenizer and kind == "ett"
        with_vq = train_tok and self.config.alpha > 0
        has_images = batch.get("images") is not None and batch["images"].numel() > 0
        image_embeds, parts = self.image_embeddings(batch["images"], with_vq) if has_images else (None, None)
        embeds = self.input_embeddings(batch["input_ids"], batch["image_mask"], image_embeds)
        if kind == "t2i":
            return self._t2i_objective(embeds, batch)
        out = self.llm(
            inputs_embeds=embeds, position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
        )
        terms: dict[str, torch.Tensor] = {}
        extra = None
        recon = None
        if with_vq and parts is not None:
            extra, terms, recon = self._vq_terms(batch["images"], parts, discriminator, step)
        result = self._text_objective(out.logits, batch["labels"], terms)
        if extra is None:
            return result
        result.terms["loss/vq"] = extra.detach()
        return result._replace(loss=result.loss + self.config.alpha * extra, reconstruction=recon)

    def _text_objective(self, logits, labels, terms) -> ETTOutput:
        """Caption / LM loss, Eq. 2: mean CE over positions whose label is not -100."""
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        flat_labels = labels.reshape(-1)
        valid = flat_labels != -100
        count = valid.sum()
        loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum") / count.clamp(
            min=1
        )
        with torch.no_grad():
            correct = ((flat_logits.argmax(-1) == flat_labels) & valid).sum()
        terms = {"loss/caption": loss.detach(), **terms}
        return ETTOutput(loss=loss, terms=terms, token_correct=correct, token_count=count)

    def _vq_terms(self, images, parts, discriminator, step):
        """L_vq through the decoder for the quantised images (Eq. 1)."""
        quantized, indices, quant_losses, stats = parts
        reconstruction = self.tokenizer.decode(quantized)
        output = TokenizerOutput(reconstruction, indices, quantized, quant_losses, stats)
        total, named = self.vq_loss.generator_loss(images, output, discriminator, step)
        terms = {f"vq/{k}": v.detach() for k, v in named.items()}
        for key, value in stats.items():
            terms[f"codebook/{key}"] = torch.as_tensor(value).detach().float()
        return total, terms, reconstruction.detach()

    def _tokenizer_objective(self, images, discriminator, step) -> ETTOutput:
        output = self.tokenizer(images)
        total, named = self.vq_loss.generator_loss(images, output, discriminator, step)
        terms = {"loss/vq": total.detach(), **{f"vq/{k}": v.detach() for k, v in named.items()}}
        for key, value in output.stats.items():
            terms[f"codebook/{key}"] = torch.as_tensor(value).detach().float()
        return ETTOutput(loss=total, terms=terms, reconstruction=output.reconstruction.detach())

    def _t2i_objective(self, embeds, batch) -> ETTOutput:
        """Next-code CE over K at the positions that predict an image code (Emu3-style, tokenizer frozen)."""
        with torch.no_grad():
            targets = self.tokenizer.encode(batch["images"]).flatten()
        hidden = self.llm(
            inputs_embeds=embeds, position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
        ).hidden_states
        selected = hidden[batch["image_loss_mask"]]
        if selected.shape[0] != targets.shape[0]:
            raise ValueError(
                f"image_loss_mask selects {selected.shape[0]} positions for {targets.shape[0]} image codes"
            )
        logits = self.visual_head(selected).float()
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
        return ETTOutput(
            loss=loss,
            terms={"loss/t2i": loss.detach()},
            token_correct=correct,
            token_count=torch.tensor(targets.numel()),
        )
