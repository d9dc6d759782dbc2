"""Training and inference lay out the same tokens: the inference prompt of each task equals, token for token, the
prefix of a training sample read through the real data path (shards -> loader -> processing -> packing) up to the
first token the model is trained to predict; plus the layout rules of data_pipeline/layouts.py on their own."""

import numpy as np
import pytest

from data_pipeline.layouts import SequenceBuilder, caption_prompt, image_span, t2i_prompt
from data_pipeline.processing import IGNORE
from tests.tiny_configs import stage_config


def _training_sample(kind: str, tiny_data, tmp_path, **data):
    """(config, text tokenizer, raw row, token ids, labels, image_loss_mask) of the first sample of the first
    packed batch that the stage's training loader yields."""
    from data_pipeline.text_tokenizer import TextTokenizer
    from training.config import from_dict
    from training.data import build_train_loader
    from training.run_config import TrainConfig

    sections = {"stage": {"init_llm_from": str(tmp_path)}, "data": {"seq_len": 128, **data}}
    cfg = from_dict(TrainConfig, stage_config(kind, tiny_data, tmp_path / "run", **sections))
    loader = build_train_loader(cfg, 0, 1)
    batch = next(loader)
    draw = loader.mixture.locate(*loader.last_batch_keys[0])  # row 0 of the batch starts with this sample
    row = loader.datasets[draw.dataset].row(draw.shard, draw.row)
    first = batch["segment_ids"][0] == 1
    ids, labels = batch["input_ids"][0][first].tolist(), batch["labels"][0][first].tolist()
    image_loss = batch["image_loss_mask"][0][first].tolist()
    return cfg, TextTokenizer.load(cfg.data.text_tokenizer), row, ids, labels, image_loss


def _loaded(cfg, tok):
    """What inference knows of a model: its text tokenizer and run config (the export's); no weights needed."""
    from training.infer import LoadedExport

    return LoadedExport(model=None, text_tokenizer=tok, config=cfg, components=["llm", "vision_tokenizer"])


def _texts(row, role=None):
    return [
        s["text"] for s in row["segments"] if s["text"] is not None and (role is None or s["role"] == role)
    ]


def test_caption_prompt_is_the_training_prefix(tiny_data, tmp_path):
    from training.infer import caption_prompt_ids

    cfg, tok, row, ids, labels, _ = _training_sample("align", tiny_data, tmp_path)
    first_target = next(t for t, label in enumerate(labels) if label != IGNORE)
    prompt = caption_prompt_ids(_loaded(cfg, tok))
    assert ids[: first_target + 1] == prompt
    assert ids[len(prompt) :] == tok.encode(_texts(row)[0]) + [tok.eos_id]  # what captioning must generate
    assert prompt.count(tok.image_placeholder_id) == np.prod(_loaded(cfg, tok).grid)


def test_chat_prompt_is_the_training_prefix(tiny_data, tmp_path):
    from training.infer import caption_prompt_ids

    cfg, tok, row, ids, labels, _ = _training_sample("chat_sft", tiny_data, tmp_path)
    assert cfg.stage.kind == "chat_sft"
    first_target = next(t for t, label in enumerate(labels) if label != IGNORE)
    question, answer = _texts(row, "user")[0], _texts(row, "assistant")[0]
    prompt = caption_prompt_ids(_loaded(cfg, tok), question)
    assert ids[: first_target + 1] == prompt
    assert prompt[:2] == [tok.bos_id, tok.user_id] and prompt[-1] == tok.assistant_id
    assert ids[len(prompt) : len(prompt) + len(tok.encode(answer)) + 1] == tok.encode(answer) + [tok.eos_id]


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_t2i_prompts_are_the_training_prefix(tiny_data, tmp_path, dropout):
    """The conditional prompt is a t2i sample up to the first position that predicts a code; the unconditional
    one is a caption-dropped sample's."""
    from training.infer import t2i_prompt_ids

    cfg, tok, row, ids, _, image_loss = _training_sample("t2i", tiny_data, tmp_path, caption_dropout=dropout)
    cond, uncond = t2i_prompt_ids(_loaded(cfg, tok), _texts(row)[0])
    first_code = image_loss.index(True)
    assert ids[: first_code + 1] == (cond if dropout == 0.0 else uncond)
    assert uncond == [tok.bos_id, tok.image_start_id]
    span = image_span(tok, _loaded(cfg, tok).grid)
    assert ids[first_code : first_code + len(span)] == span
    predicts_code = [next_id == tok.image_placeholder_id for next_id in ids[1:]] + [False]
    assert image_loss == predicts_code


class _Tok:
    """Distinct ids for the special tokens; text encodes to one id per character (100 + ord)."""

    pad_id, bos_id, eos_id, image_start_id, row_end_id, image_end_id = 0, 1, 2, 3, 4, 5
    image_placeholder_id, user_id, assistant_id = 6, 7, 8

    def encode(self, text):
        return [100 + ord(c) for c in text]


def test_layouts_against_written_out_sequences():
    tok, grid = _Tok(), (2, 3)
    span = [3, 6, 6, 6, 4, 6, 6, 6, 4, 5]
    assert image_span(tok, grid) == span
    assert caption_prompt(tok, grid) == [1, *span]
    assert caption_prompt(tok, grid, "ab") == [1, *span, 197, 198]
    assert caption_prompt(tok, grid, "ab", chat=True) == [1, 7, *span, 197, 198, 8]
    assert caption_prompt(tok, grid, chat=True) == [1, 7, *span, 8]
    assert t2i_prompt(tok, grid, "ab") == [1, 197, 198, 3] and t2i_prompt(tok, grid) == [1, 3]

    chat = SequenceBuilder(tok, grid, "chat")
    chat.image("user").text("q", "user").text("a", "assistant").text("r", None).text("b", "assistant")
    seq = chat.finish()
    assert seq.input_ids == [1, 7, *span, 213, 8, 197, 2, 7, 214, 8, 198, 2]
    labelled = [int(t) for t in seq.labels() if t != IGNORE]
    assert labelled == [197, 2, 198, 2] and not seq.image_loss_mask().any()
    assert seq.image_starts == [2] and seq.span_length == len(span)

    t2i = SequenceBuilder(tok, grid, "t2i").text("c").image().finish()
    assert t2i.input_ids == [1, 199, *span, 2] and (t2i.labels() == IGNORE).all()
    mask = t2i.image_loss_mask()
    assert mask.sum() == 6 and [t2i.input_ids[t + 1] for t in np.flatnonzero(mask)] == [6] * 6
