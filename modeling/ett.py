"""ETTModel: VQ tokenizer + projector + decoder LLM (+ visual head for generation), the model of ETT (Wang et al.,
arXiv 2505.10562, §3). It returns outputs, never losses: the objectives live in training/objectives.py.

Visual input (one of):
  embedding (ETT): images -> encoder -> IBQ straight-through codebook embeddings z_q -> projector -> LLM inputs.
                   The caption loss reaches the projector, the codebook (all rows, through IBQ's soft path) and
                   the encoder.
  index (Emu3-style baseline): frozen tokenizer indices -> a learned embedding table (K x C) -> LLM inputs.

Which components exist is fixed at construction (`with_llm`, `with_tokenizer`): a tokenizer alone (stage 0), an
LLM alone (text pretraining) or both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import nn

from modeling.layers import NormalInitEmbedding
from modeling.llm import DecoderLM, LLMConfig
from modeling.llm.model import LinearHead
from modeling.projector import Projector, ProjectorConfig
from modeling.tokenizer import TokenizerConfig, TokenizerOutput, VQTokenizer


@dataclass
class ETTConfig:
    """What the model is: how images enter the LLM, and whether a visual head predicts image codes (t2i).

    `fused_head_loss`: training forwards return hidden states instead of the LM head's logits, and the heads'
    CE comes from the fused linear cross-entropy (modeling/kernels), never materialising the [tokens, V] logits.
    """

    visual_input: Literal["embedding", "index"] = "embedding"
    visual_head: bool = False
    fused_head_loss: bool = True

    # Objective and trainer options that lived here once -> where they went (the config loader says so).
    REMOVED_OPTIONS: ClassVar[dict[str, str]] = {
        name: f"moved to stage.{name} (an objective or trainer option, not part of the model)"
        for name in ("alpha", "train_tokenizer", "train_discriminator")
    }


class ETTOutput(NamedTuple):
    """What one forward computed; fields a forward did not compute are None. A NamedTuple so that DeepSpeed ZeRO-3
    sees its tensors and hooks the backward pass.

    logits [B, S, V]: the LM head over every position (text inputs), without fused_head_loss.
    hidden_states [B, S, C], llm: with fused_head_loss, the LLM's final hidden states and the LLM, whose head mode
        llm(head_hidden=hidden_states, labels=labels) gives the caption CE totals without logits.
    tokenizer: the tokenizer's output: a full forward for images alone (stage 0), or, with `reconstruct=True`,
        the straight-through codes the LLM read, decoded again (for L_vq).
    visual_logits [M, K], visual_targets [M]: the visual head at the positions of `image_loss_mask` (without
        fused_head_loss) and the frozen tokenizer's code ids there (t2i).
    visual_hidden [M, C], visual_head: with fused_head_loss, the LLM's hidden states at those positions and the
        visual head, whose visual_head(visual_hidden, visual_targets) gives the CE totals without logits.
    """

    logits: torch.Tensor | None = None
    tokenizer: TokenizerOutput | None = None
    visual_logits: torch.Tensor | None = None
    visual_targets: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    llm: DecoderLM | None = None
    visual_hidden: torch.Tensor | None = None
    visual_head: LinearHead | None = None


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
            self.visual_head = LinearHead(hidden, codes, llm_config.init_std)

    # ---- visual path -------------------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor, keep_codes: bool = False):
        """images [M, 3, H, W] -> (LLM-space embeddings [M*h*w, C] in row-major order, the tokenizer's
        (quantized, indices, quant_losses, stats) when `keep_codes` and the codes are differentiable, else None)."""
        if self.config.visual_input == "index":
            with torch.no_grad():
                indices = self.tokenizer.encode(images)
            return self.index_embedding(indices.flatten()), None
        quantized, indices, quant_losses, stats = self.tokenizer.quantize_images(
            images, with_losses=keep_codes
        )
        codes = quantized.permute(0, 2, 3, 1).reshape(-1, quantized.shape[1])
        parts = (quantized, indices, quant_losses, stats) if keep_codes else None
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

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_loss_mask: torch.Tensor | None = None,
        reconstruct: bool = False,
    ) -> ETTOutput:
        """Packed rows (input_ids, position_ids, segment_ids [B, S]) with images [M, 3, H, W] scattered in at
        `image_mask` [B, S]. Images alone (no input_ids): the tokenizer's forward. `image_loss_mask` [B, S]: the
        visual head at those positions and the code ids to predict there. `reconstruct`: also decode the
        straight-through codes the LLM read."""
        if input_ids is None:
            return ETTOutput(tokenizer=self.tokenizer(images))
        if not hasattr(self, "tokenizer"):
            out = self.llm(
                input_ids=input_ids,
                position_ids=position_ids,
                segment_ids=segment_ids,
                with_logits=not self.config.fused_head_loss,
            )
            return self._text_outputs(out)
        has_images = images is not None and images.numel() > 0
        image_embeds, parts = self.image_embeddings(images, reconstruct) if has_images else (None, None)
        embeds = self.input_embeddings(input_ids, image_mask, image_embeds)
        if image_loss_mask is not None:
            return self._visual_head_outputs(embeds, position_ids, segment_ids, images, image_loss_mask)
        out = self.llm(
            inputs_embeds=embeds,
            position_ids=position_ids,
            segment_ids=segment_ids,
            with_logits=not self.config.fused_head_loss,
        )
        if parts is None:
            return self._text_outputs(out)
        quantized, indices, quant_losses, stats = parts
        decoded = TokenizerOutput(self.tokenizer.decode(quantized), indices, quantized, quant_losses, stats)
        return self._text_outputs(out, decoded)

    def _text_outputs(self, out, tokenizer: TokenizerOutput | None = None) -> ETTOutput:
        """The LLM's logits, or with fused_head_loss its hidden states and itself (for the head mode)."""
        if self.config.fused_head_loss:
            return ETTOutput(hidden_states=out.hidden_states, llm=self.llm, tokenizer=tokenizer)
        return ETTOutput(logits=out.logits, tokenizer=tokenizer)

    def _visual_head_outputs(self, embeds, position_ids, segment_ids, images, image_loss_mask) -> ETTOutput:
        """The visual head at the positions that predict an image code, and the frozen tokenizer's codes there."""
        with torch.no_grad():
            targets = self.tokenizer.encode(images).flatten()
        hidden = self.llm(
            inputs_embeds=embeds, position_ids=position_ids, segment_ids=segment_ids, with_logits=False
        ).hidden_states
        selected = hidden[image_loss_mask]
        if selected.shape[0] != targets.shape[0]:
            raise ValueError(
                f"image_loss_mask selects {selected.shape[0]} positions for {targets.shape[0]} image codes"
            )
        if self.config.fused_head_loss:
            return ETTOutput(visual_hidden=selected, visual_targets=targets, visual_head=self.visual_head)
        return ETTOutput(visual_logits=self.visual_head(selected), visual_targets=targets)
