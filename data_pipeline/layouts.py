"""The token layouts of every sequence the model sees, in training and at inference (defined here and nowhere else).

Training (data_pipeline/processing.py) builds whole samples with `SequenceBuilder`; inference (training/infer.py)
and the demo report (examples/demo/report.py) build their prompts with `caption_prompt` and `t2i_prompt`, which are
the same builder stopped where the generated part begins. Special tokens are the `TextTokenizer` ids
(data_pipeline/text_tokenizer.py).

An image whose code grid is h x w (h = H / downsample, w = W / downsample) is the span

    IMAGE_START, (IMAGE_PLACEHOLDER x w, ROW_END) x h, IMAGE_END

whose placeholders receive the image's h*w embeddings in row-major order. Layouts by task:

- caption / interleaved / text: BOS, segments in order, EOS. Loss on every text token and on EOS.
  Caption prompt (inference): BOS, image span, optional prompt text; the caption follows.
- chat: BOS, then per turn the role token (USER / ASSISTANT) and the turn's segments; an assistant turn ends with
  EOS. Loss on assistant text tokens and their EOS only.
  Chat prompt (inference): BOS, USER, image span, question, ASSISTANT; the answer follows.
- t2i: BOS, caption, image span, EOS. No text loss; the visual head predicts the image's codes: position t is an
  image target when token t+1 is a placeholder (IMAGE_START, every code but the last of its row, every ROW_END).
  Caption-dropped samples (classifier-free guidance) are BOS, image span, EOS.
  t2i prompt (inference): BOS, prompt, IMAGE_START (unconditional: BOS, IMAGE_START); sampling then walks the grid
  (modeling/generation_t2i.py).

`TokenSequence.labels()[t]` is the target predicted at position t (already shifted), IGNORE where no loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = -100
TEXT_LOSS_TASKS = ("caption", "interleaved", "text")


def image_grid(image_size: tuple[int, int], downsample: int) -> tuple[int, int]:
    """(h, w) of an image of `image_size` (H, W) under a tokenizer that downsamples by `downsample`."""
    return image_size[0] // downsample, image_size[1] // downsample


def image_span(tok, grid: tuple[int, int]) -> list[int]:
    """The token ids of one image of `grid` (h, w): IMAGE_START, (IMAGE_PLACEHOLDER x w, ROW_END) x h, IMAGE_END."""
    height, width = grid
    return (
        [tok.image_start_id]
        + ([tok.image_placeholder_id] * width + [tok.row_end_id]) * height
        + [tok.image_end_id]
    )


@dataclass
class TokenSequence:
    """One sequence in layout order. `text_targets[t]`: token t is a text-loss target (predicted at t - 1);
    `code_targets[t]`: token t is an image code the visual head predicts (at t - 1); `image_starts`: the index of
    each image's IMAGE_START; `span_length`: the length of one image span."""

    input_ids: list[int] = field(default_factory=list)
    text_targets: list[bool] = field(default_factory=list)
    code_targets: list[bool] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)
    span_length: int = 0

    def labels(self) -> np.ndarray:
        """int64 [n]: labels[t] = input_ids[t + 1] where that token is a text target, IGNORE elsewhere."""
        ids = np.asarray(self.input_ids, dtype=np.int64)
        targets = np.asarray(self.text_targets[1:] + [False])
        return np.where(targets, np.append(ids[1:], 0), IGNORE).astype(np.int64)

    def image_loss_mask(self) -> np.ndarray:
        """bool [n]: True at t where the visual head predicts the code at t + 1."""
        return np.asarray(self.code_targets[1:] + [False], dtype=bool)


class SequenceBuilder:
    """Builds one sequence of `task` piece by piece, in segment order: `text`, `image`, then `finish`.

    For chat, each piece carries its turn's role (None counts as "user"); a change of role writes the role token,
    and closing an assistant turn writes its EOS. Other tasks ignore roles.
    """

    def __init__(self, tok, grid: tuple[int, int], task: str):
        self.tok, self.task = tok, task
        self.span = image_span(tok, grid)
        self._span_codes = [t == tok.image_placeholder_id for t in self.span]
        self._no_codes = [False] * len(self.span)
        self.role: str | None = None
        self.seq = TokenSequence(span_length=len(self.span))
        self._emit([tok.bos_id], False)

    def _emit(self, tokens: list[int], text_target: bool, code_targets: list[bool] | None = None) -> None:
        self.seq.input_ids.extend(tokens)
        self.seq.text_targets.extend([text_target] * len(tokens))
        self.seq.code_targets.extend(code_targets if code_targets is not None else [False] * len(tokens))

    def turn(self, role: str | None) -> SequenceBuilder:
        """Chat: open `role`'s turn unless it is already open (an open assistant turn is closed with EOS)."""
        role = role or "user"
        if self.task == "chat" and role != self.role:
            if self.role == "assistant":
                self._emit([self.tok.eos_id], True)
            self._emit([self.tok.user_id if role == "user" else self.tok.assistant_id], False)
            self.role = role
        return self

    def text(self, text: str, role: str | None = None) -> SequenceBuilder:
        self.turn(role)
        loss = self.task in TEXT_LOSS_TASKS or (self.task == "chat" and self.role == "assistant")
        self._emit(self.tok.encode(text), loss)
        return self

    def image(self, role: str | None = None) -> SequenceBuilder:
        """One image span (its pixels are the caller's); in t2i its codes are the visual head's targets."""
        self.turn(role)
        self.seq.image_starts.append(len(self.seq.input_ids))
        self._emit(self.span, False, self._span_codes if self.task == "t2i" else self._no_codes)
        return self

    def finish(self) -> TokenSequence:
        """Close the sequence: EOS (a text target except in t2i); chat: EOS only to close an assistant turn."""
        if self.task != "chat":
            self._emit([self.tok.eos_id], self.task != "t2i")
        elif self.role == "assistant":
            self._emit([self.tok.eos_id], True)
        return self.seq


def caption_prompt(tok, grid: tuple[int, int], prompt: str | None = None, chat: bool = False) -> list[int]:
    """What precedes the generated text for one image: BOS, image span, prompt (caption layout); with `chat`,
    BOS, USER, image span, prompt, ASSISTANT (the chat layout, the answer follows)."""
    builder = SequenceBuilder(tok, grid, "chat" if chat else "caption")
    builder.image(role="user")
    if prompt:
        builder.text(prompt, role="user")
    if chat:
        builder.turn("assistant")
    return list(builder.seq.input_ids)


def t2i_prompt(tok, grid: tuple[int, int], prompt: str | None = None) -> list[int]:
    """What precedes the first image code: BOS, prompt, IMAGE_START; without a prompt, the caption-dropped
    (unconditional) context BOS, IMAGE_START."""
    builder = SequenceBuilder(tok, grid, "t2i")
    if prompt:
        builder.text(prompt)
    builder.image()
    return builder.seq.input_ids[: builder.seq.image_starts[-1] + 1]
