"""The text tokenizer and the special tokens of the whole project (defined here and nowhere else).

An image of h x w tokens is written as the span (Emu3-style wrapping; every layout is in data_pipeline/layouts.py; without Emu3's "H*W" text
prefix and EOF token)::

    IMAGE_START, (IMAGE_PLACEHOLDER x w, ROW_END) x h, IMAGE_END

`TextTokenizer` wraps either a sentencepiece model (`train_sentencepiece` trains one, e.g. on the synthetic captions)
or a Hugging Face tokenizer directory. Special tokens are never produced from raw text: `encode` treats its input as
plain text, and the processor inserts special ids explicitly. `save(dir)` writes a `tokenizer.json` that
`transformers.AutoTokenizer.from_pretrained(dir)` loads and that encodes plain text exactly like `encode`.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable
from pathlib import Path

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
IMAGE_START = "<|image_start|>"
ROW_END = "<|row_end|>"
IMAGE_END = "<|image_end|>"
IMAGE_PLACEHOLDER = "<|image|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE_START, ROW_END, IMAGE_END, IMAGE_PLACEHOLDER, USER, ASSISTANT]
UNK = "<unk>"
SPM_MODEL_FILE = "spm.model"


class TextTokenizer:
    """Plain-text encode/decode plus the ids of every special token.

    Build it with `TextTokenizer.load(path)`: `path` is a sentencepiece `.model` file, a directory holding
    `spm.model`, or a Hugging Face tokenizer directory (special tokens missing from it are added as new tokens,
    so `vocab_size` can grow; the LLM's embedding must have at least `vocab_size` rows).
    """

    def __init__(self, sp_model=None, hf_tokenizer=None, source: str = ""):
        if (sp_model is None) == (hf_tokenizer is None):
            raise ValueError("TextTokenizer needs exactly one of a sentencepiece model or an HF tokenizer")
        self.sp_model, self.hf_tokenizer, self.source = sp_model, hf_tokenizer, source
        if sp_model is not None:
            ids = {tok: sp_model.piece_to_id(tok) for tok in SPECIAL_TOKENS}
            missing = [tok for tok, i in ids.items() if sp_model.id_to_piece(i) != tok]
            if missing:
                raise ValueError(
                    f"sentencepiece model {source} lacks the special tokens {missing}; train it with "
                    "data_pipeline.text_tokenizer.train_sentencepiece"
                )
        else:
            missing = [tok for tok in SPECIAL_TOKENS if tok not in hf_tokenizer.get_vocab()]
            if missing:
                hf_tokenizer.add_special_tokens({"additional_special_tokens": missing})
            ids = {tok: hf_tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
        self.special_ids: dict[str, int] = ids
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.image_start_id, self.row_end_id, self.image_end_id = (
            ids[IMAGE_START],
            ids[ROW_END],
            ids[IMAGE_END],
        )
        self.image_placeholder_id, self.user_id, self.assistant_id = (
            ids[IMAGE_PLACEHOLDER],
            ids[USER],
            ids[ASSISTANT],
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        path = Path(path)
        if path.is_dir() and (path / SPM_MODEL_FILE).is_file():
            path = path / SPM_MODEL_FILE
        if path.is_file() and path.suffix == ".model":
            import sentencepiece as spm

            return cls(sp_model=spm.SentencePieceProcessor(model_file=str(path)), source=str(path))
        if path.is_dir():
            from transformers import AutoTokenizer

            return cls(hf_tokenizer=AutoTokenizer.from_pretrained(str(path)), source=str(path))
        raise FileNotFoundError(
            f"text tokenizer {path}: expected a sentencepiece .model file, a directory with {SPM_MODEL_FILE}, or a "
            "Hugging Face tokenizer directory"
        )

    @property
    def vocab_size(self) -> int:
        return self.sp_model.vocab_size() if self.sp_model is not None else len(self.hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, without BOS/EOS; special-token strings in `text` are not turned into special ids.

        Trailing whitespace is dropped (as the exported `tokenizer.json` does), so both encode alike.
        """
        if self.sp_model is not None:
            return self.sp_model.encode(text.rstrip())
        return self.hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = set(self.special_ids.values())
            ids = [i for i in ids if i not in special]
        if self.sp_model is not None:
            return self.sp_model.decode(ids)
        return self.hf_tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` (loadable by `transformers.AutoTokenizer`), and for a
        sentencepiece tokenizer also `spm.model` (loadable by `TextTokenizer.load`)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.hf_tokenizer is not None:
            self.hf_tokenizer.save_pretrained(str(out_dir))
            return
        (out_dir / SPM_MODEL_FILE).write_bytes(self.sp_model.serialized_model_proto())
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import SpmConverter

        backend = SpmConverter(types.SimpleNamespace(vocab_file=str(out_dir / SPM_MODEL_FILE))).converted()
        hf = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token=PAD,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=UNK,
            additional_special_tokens=SPECIAL_TOKENS[3:],
        )
        hf.save_pretrained(str(out_dir))


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, model_type: str = "unigram"
) -> TextTokenizer:
    """Train a sentencepiece model on `texts` and save it (with its HF `tokenizer.json`) to `out_dir`.

    Ids 0..2 are PAD, BOS, EOS, id 3 is `<unk>`, and the other special tokens follow as control symbols.
    `vocab_size` is an upper bound: a small corpus may give fewer pieces.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: the corpus has no non-empty text")
    prefix = out_dir / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        pad_piece=PAD,
        bos_id=1,
        bos_piece=BOS,
        eos_id=2,
        eos_piece=EOS,
        unk_id=3,
        unk_piece=UNK,
        control_symbols=SPECIAL_TOKENS[3:],
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    tokenizer = TextTokenizer.load(f"{prefix}.model")
    tokenizer.save(out_dir)
    return tokenizer
