"""Weight conversion against transformers itself: HF -> ours (`load_hf_llm`) and ours -> HF (`write_hf_llm`, the
streaming writer that training.export uses) give transformers' logits and greedy tokens; bad checkpoints raise
errors that name the file and the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from modeling.llm import DecoderLM, generate
from training import hf_import
from training.hf_convert import llm_config_from_hf, load_hf_llm, write_hf_llm

VOCAB, PROMPT_LEN = 128, 9
# (architecture, kv heads, tied, rope theta, how the HF directory is written)
CASES = {
    "qwen2_gqa_tied_1e6_sharded": ("qwen2", 2, True, 1e6, "safetensors_sharded"),
    "qwen2_mha_untied_1e4": ("qwen2", 4, False, 1e4, "safetensors"),
    "llama_gqa_untied_1e4_bin": ("llama", 2, False, 1e4, "bin_sharded"),
    "llama_mha_tied_1e6_bin": ("llama", 4, True, 1e6, "bin"),
}


def _hf_model(arch: str, kv_heads: int, tied: bool, theta: float):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = (
        Qwen2ForCausalLM(Qwen2Config(**common))
        if arch == "qwen2"
        else LlamaForCausalLM(LlamaConfig(**common))
    )
    with torch.no_grad():  # larger random weights than HF's init, so that every tensor visibly matters
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def _write_hf(model, out_dir, layout: str) -> None:
    """safetensors layouts through transformers' save_pretrained; .bin layouts as older transformers wrote them."""
    if layout.startswith("safetensors"):
        model.save_pretrained(out_dir, max_shard_size="20KB" if layout.endswith("sharded") else "50GB")
        return
    model.config.save_pretrained(out_dir)
    state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not (model.config.tie_word_embeddings and k == "lm_head.weight")
    }
    if layout == "bin":
        torch.save(state, out_dir / "pytorch_model.bin")
        return
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file_name, keys in shards.items():
        torch.save({k: state[k] for k in keys}, out_dir / file_name)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (out_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.mark.parametrize("case", list(CASES))
def test_hf_roundtrip_logits_and_greedy_tokens(case, tmp_path, seed_everything):
    arch, kv_heads, tied, theta, layout = CASES[case]
    hf_model = _hf_model(arch, kv_heads, tied, theta)
    _write_hf(hf_model, tmp_path / "hf", layout)
    input_ids = torch.randint(0, VOCAB, (2, PROMPT_LEN))
    with torch.no_grad():
        hf_logits = hf_model(input_ids=input_ids).logits
    assert hf_logits.std() > 0.5

    ours, config = load_hf_llm(tmp_path / "hf")
    assert (config.num_kv_heads, config.tie_embeddings, config.rope_theta) == (kv_heads, tied, theta)
    assert config.qkv_bias == (arch == "qwen2")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, hf_logits, atol=1e-5, rtol=1e-5)

    hf_tokens = hf_model.generate(input_ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    our_tokens = generate(ours, input_ids=input_ids, max_new_tokens=20)
    assert torch.equal(our_tokens, hf_tokens[:, PROMPT_LEN:])

    write_hf_llm(ours.state_dict(), config, tmp_path / "export", max_shard_size="30KB")
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is type(hf_model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, hf_logits, atol=1e-5, rtol=1e-5)
    reloaded_tokens = reloaded.generate(input_ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(reloaded_tokens, hf_tokens)
    again, _ = load_hf_llm(tmp_path / "export")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_export_in_bf16_single_file(tmp_path, seed_everything):
    hf_model = _hf_model("qwen2", 2, True, 1e6)
    hf_model.save_pretrained(tmp_path / "hf")
    ours, config = load_hf_llm(tmp_path / "hf")
    write_hf_llm(ours.state_dict(), config, tmp_path / "export", dtype=torch.bfloat16)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "export" / "model.safetensors.index.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.bfloat16)
    for name, param in hf_model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], param.to(torch.bfloat16), atol=0, rtol=0)


def test_export_ships_the_text_tokenizer(tmp_path, tiny_data, seed_everything):
    """With a text tokenizer the writer copies its files and puts its special ids into config.json; a Llama-type
    export loads through AutoTokenizer with the same encoding."""
    from data_pipeline.text_tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(tiny_data / "tokenizer")
    ours, config = load_hf_llm(_saved_hf(tmp_path, arch="llama"))
    write_hf_llm(ours.state_dict(), config, tmp_path / "export", text_tokenizer=tokenizer)
    hf_config = AutoConfig.from_pretrained(tmp_path / "export")
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )
    text = "three red glyphs on a blue background"
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    incomplete = {k: v for k, v in ours.state_dict().items() if k != "output_layer.weight"}
    with pytest.raises(ValueError, match=r"lack \['output_layer\.weight'\]"):
        write_hf_llm(incomplete, config, tmp_path / "incomplete")


def test_legacy_config_fields():
    """Qwen2.5's config.json keeps rope_theta at the top level and a sliding_window that is switched off."""
    legacy = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    }
    config = llm_config_from_hf(legacy)
    assert (config.rope_theta, config.num_kv_heads, config.qkv_bias, config.tie_embeddings) == (
        1e6,
        2,
        True,
        True,
    )


def _saved_hf(tmp_path, arch: str = "qwen2", **kwargs):
    hf_model = _hf_model(arch, 2, False, 1e4)
    hf_model.save_pretrained(tmp_path / "hf", **kwargs)
    return tmp_path / "hf"


def test_unsupported_architecture_names_config(tmp_path):
    hf_dir = _saved_hf(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported architecture.*MistralForCausalLM"):
        load_hf_llm(hf_dir)


def test_unsupported_rope_scaling_names_field(tmp_path):
    hf_dir = _saved_hf(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        load_hf_llm(hf_dir)


def test_missing_shard_names_file_and_tensor(tmp_path):
    hf_dir = _saved_hf(tmp_path, max_shard_size="20KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    (hf_dir / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard}.*missing.*model\."):
        load_hf_llm(hf_dir)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    hf_dir = _saved_hf(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 64
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape"
    ):
        load_hf_llm(hf_dir)


def test_missing_weights_and_unknown_tensors(tmp_path):
    hf_dir = _saved_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_llm(tmp_path)
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="config_only: no weights found"):
        load_hf_llm(tmp_path / "config_only")
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.1\..*no place"):
        load_hf_llm(hf_dir)


def test_hf_import_cli(tmp_path, capsys, seed_everything):
    with pytest.raises(SystemExit) as exit_info:
        hf_import.main(["--help"])
    assert exit_info.value.code == 0
    assert "--hf" in capsys.readouterr().out
    hf_model = _hf_model("llama", 2, True, 1e4)
    hf_model.save_pretrained(tmp_path / "hf")
    assert (
        hf_import.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"), "--vocab-size", "130"])
        == 0
    )
    ours = DecoderLM.from_pretrained(tmp_path / "ours")
    assert ours.config.vocab_size == 130
    input_ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=input_ids).logits[..., :VOCAB],
            hf_model(input_ids=input_ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    assert hf_import.main(["--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
