"""Text tokenizer: the saved directory loads in transformers.AutoTokenizer and encodes plain text like ours."""

import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_pipeline.synthetic import text_samples
from data_pipeline.text_tokenizer import SPECIAL_TOKENS, TextTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = [s["segments"][0]["text"] for s in text_samples(np.random.default_rng(0), 2000, "t")]
    return train_sentencepiece(corpus, out, vocab_size=128), out


def random_texts(n=300):
    rng = np.random.default_rng(1)
    alphabet = list("abcdefghkmnoprstuvwxyz ABCZ.,:;!?'0129-") + ["  ", "ä", "red ", "green ", "text on "]
    return ["".join(rng.choice(alphabet, int(rng.integers(0, 30)))) for _ in range(n)]


def test_special_tokens_have_distinct_ids(trained):
    tok, _ = trained
    ids = [tok.special_ids[t] for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and max(ids) < tok.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert not set(tok.encode("<|image|> <|row_end|>")) & set(ids)  # special strings in text stay text


def test_saved_dir_loads_in_autotokenizer_and_encodes_alike(trained):
    tok, out = trained
    hf = AutoTokenizer.from_pretrained(str(out))
    for t in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(t) == tok.special_ids[t]
    for text in random_texts():
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
    text = "green text on red: owl moon"
    assert tok.decode(tok.encode(text)) == text == hf.decode(tok.encode(text))


def test_hf_directory_is_wrapped(trained, tmp_path):
    tok, out = trained
    shutil.copy(out / "tokenizer.json", tmp_path)
    shutil.copy(out / "tokenizer_config.json", tmp_path)
    wrapped = TextTokenizer.load(tmp_path)
    assert wrapped.hf_tokenizer is not None and wrapped.special_ids == tok.special_ids
    for text in random_texts(100):
        assert wrapped.encode(text) == tok.encode(text)
    wrapped.save(tmp_path / "again")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "again")).encode(
        "red abc", add_special_tokens=False
    ) == tok.encode("red abc")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text tokenizer"):
        TextTokenizer.load(tmp_path / "nope")
