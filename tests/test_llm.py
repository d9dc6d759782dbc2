"""DecoderLM behaviour against independent references: each packed sample run alone, a full forward for the KV
cache, a naive attention, the non-checkpointed model, and the SDPA path for flash-attn (GPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from modeling.llm import DecoderLM, KVCache, LLMConfig, generate

VOCAB = 80


def _model(**overrides) -> DecoderLM:
    options = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        init_std=0.2,
        rope_theta=1e4,
    )
    options.update(overrides)
    return DecoderLM(LLMConfig(**options)).eval()


@pytest.mark.parametrize("num_kv_heads", [2, 4])
def test_packed_rows_equal_each_sample_alone(num_kv_heads, seed_everything):
    model = _model(num_kv_heads=num_kv_heads)
    lengths = [[5, 3, 4], [9, 3]]  # row 1 ends with 3 padding positions (segment 0)
    seq_len = 12
    input_ids = torch.randint(0, VOCAB, (2, seq_len))
    segment_ids = torch.tensor([[1] * 5 + [2] * 3 + [3] * 4, [1] * 9 + [0] * 3])
    with torch.no_grad():
        packed = model(input_ids=input_ids, segment_ids=segment_ids).logits
        for row, row_lengths in enumerate(lengths):
            start = 0
            for length in row_lengths:
                alone = model(input_ids=input_ids[row : row + 1, start : start + length]).logits[0]
                if segment_ids[row, start] != 0:
                    torch.testing.assert_close(
                        packed[row, start : start + length], alone, atol=1e-5, rtol=1e-5
                    )
                start += length
        unpacked = model(input_ids=input_ids).logits
    assert not torch.allclose(unpacked[0, 5:], packed[0, 5:], atol=1e-3)  # packing changed something


def _naive_forward(model: DecoderLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Straight-line re-implementation of the decoder from its weights (explicit softmax attention, repeated kv)."""
    cfg = model.config
    d, groups = cfg.head_dim, cfg.num_kv_heads
    per_group = cfg.num_heads // groups
    seq_len = input_ids.shape[1]
    x = model.embedding.word_embeddings.weight[input_ids]
    pos = torch.arange(seq_len, dtype=torch.float64)
    inv_freq = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.outer(pos, inv_freq)
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(t):  # t [B, H, S, d]; pairs (i, i + d/2) rotate by angle_i
        a, b = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)
    for layer in model.decoder.layers:
        att = layer.self_attention
        h = rms(x, layer.input_layernorm.weight)
        qkv = (h @ att.linear_qkv.weight.T + att.linear_qkv.bias).view(*h.shape[:2], groups, per_group + 2, d)
        q = qkv[:, :, :, :per_group].flatten(2, 3).transpose(1, 2)
        k = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2).transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2).transpose(1, 2)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d) + causal
        out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + out @ att.linear_proj.weight.T
        h = rms(x, layer.pre_mlp_layernorm.weight)
        gate, up = (h @ layer.mlp.linear_fc1.weight.T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ layer.mlp.linear_fc2.weight.T
    x = rms(x, model.decoder.final_layernorm.weight)
    return x @ model.embedding.word_embeddings.weight.T


def test_forward_matches_naive_reference(seed_everything):
    model = _model()
    input_ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        torch.testing.assert_close(logits, _naive_forward(model, input_ids), atol=1e-5, rtol=1e-5)
    assert logits.std() > 0.5


def test_kv_cache_and_embeds_match_full_forward(seed_everything):
    model = _model()
    input_ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        cache = KVCache(model.config.num_layers)
        first = model(inputs_embeds=model.embed_tokens(input_ids[:, :6]), kv_cache=cache)
        middle = model(input_ids=input_ids[:, 6:9], kv_cache=cache).logits
        last = [model(input_ids=input_ids[:, t : t + 1], kv_cache=cache).logits for t in (9, 10)]
    assert first.kv_cache is cache and cache.length == 11
    torch.testing.assert_close(torch.cat([first.logits, middle, *last], dim=1), full, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_same_loss_and_grads(seed_everything):
    model = _model(tie_embeddings=False)
    checkpointed = _model(tie_embeddings=False, activation_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    model.train(), checkpointed.train()
    input_ids = torch.randint(0, VOCAB, (2, 10))
    segment_ids = torch.tensor([[1] * 4 + [2] * 6, [1] * 10])
    losses = []
    for m in (model, checkpointed):
        logits = m(input_ids=input_ids, segment_ids=segment_ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_mean_init(tied, seed_everything):
    model = _model(tie_embeddings=tied)
    old_embedding = model.embedding.word_embeddings.weight.detach().clone()
    input_ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    model.resize_token_embeddings(VOCAB + 4)
    new_embedding = model.embedding.word_embeddings.weight
    assert new_embedding.shape == (VOCAB + 4, 32) and model.config.vocab_size == VOCAB + 4
    torch.testing.assert_close(new_embedding[VOCAB:], old_embedding.mean(0).expand(4, -1))
    with torch.no_grad():
        after = model(input_ids=input_ids).logits
    assert after.shape[-1] == VOCAB + 4
    torch.testing.assert_close(after[..., :VOCAB], before)
    head = new_embedding if tied else model.output_layer.weight
    torch.testing.assert_close(after[..., VOCAB:], after[..., VOCAB : VOCAB + 1].expand(-1, -1, 4))
    assert head.shape[0] == VOCAB + 4
    with pytest.raises(ValueError, match="new_vocab_size"):
        model.resize_token_embeddings(VOCAB)


def test_save_and_load_our_format(tmp_path, seed_everything):
    model = _model(tie_embeddings=False, qkv_bias=False)
    model.save_pretrained(tmp_path / "llm")
    loaded = DecoderLM.from_pretrained(tmp_path / "llm", activation_checkpointing=True)
    assert loaded.config.activation_checkpointing and loaded.config.num_kv_heads == 2
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        DecoderLM.from_pretrained(tmp_path / "missing")
    weights = tmp_path / "llm" / "model.safetensors"
    state = load_file(weights)
    state["embedding.word_embeddings.weight"] = torch.zeros(VOCAB, 16)
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor embedding\.word_embeddings\.weight has shape"
    ):
        model.load_checked_state_dict(state, source=str(weights))


def test_removed_tensor_parallel_option(tmp_path):
    """Tensor parallelism was removed: an llm_config.json that asks for it is refused naming the option, while the
    `tensor_parallel_size: 1` that older versions wrote (it changed nothing) still loads."""
    model = _model()
    model.save_pretrained(tmp_path / "llm")
    config_path = tmp_path / "llm" / "llm_config.json"
    data = json.loads(config_path.read_text())
    assert "tensor_parallel_size" not in data
    config_path.write_text(json.dumps({**data, "tensor_parallel_size": 1}))
    assert DecoderLM.from_pretrained(tmp_path / "llm").config == model.config
    config_path.write_text(json.dumps({**data, "tensor_parallel_size": 2}))
    with pytest.raises(ValueError, match="tensor_parallel_size: tensor parallelism was removed"):
        DecoderLM.from_pretrained(tmp_path / "llm")


def test_generate_sampling_controls(seed_everything):
    model = _model()
    prompt = torch.randint(0, VOCAB, (3, 5))
    greedy = generate(model, input_ids=prompt, max_new_tokens=6)
    top1 = generate(model, input_ids=prompt, max_new_tokens=6, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(greedy, top1)
    tiny_p = generate(model, input_ids=prompt, max_new_tokens=6, do_sample=True, top_p=1e-6)
    assert torch.equal(greedy, tiny_p)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = generate(model, input_ids=prompt, max_new_tokens=6, do_sample=True, generator=g1)
    s2 = generate(model, input_ids=prompt, max_new_tokens=6, do_sample=True, generator=g2)
    assert torch.equal(s1, s2)

    allowed = torch.arange(VOCAB) % 7 == 3
    steps = []

    def only_allowed(step, logits):
        steps.append(step)
        return logits.masked_fill(~allowed, float("-inf"))

    masked = generate(
        model, input_ids=prompt, max_new_tokens=6, do_sample=True, logits_processor=only_allowed
    )
    assert bool(allowed[masked].all()) and steps == list(range(6))

    eos = int(greedy[0, 1])
    first_eos = int((greedy[0] == eos).nonzero()[0])
    stopped = generate(model, input_ids=prompt[:1], max_new_tokens=6, eos_token_id=eos)
    assert stopped.tolist() == [greedy[0, : first_eos + 1].tolist()]


def test_bad_inputs_raise_clear_errors():
    model = _model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        model(input_ids=ids, segment_ids=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heads"):
        LLMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="attention_backend='flash' needs"):
        _model(attention_backend="flash")(input_ids=ids)


def test_varlen_layout_covers_the_same_pairs_as_the_block_mask():
    """The cu_seqlens of the CUDA varlen path, expanded to a dense causal mask over the flattened tokens, equal the
    block-diagonal causal bool mask that SDPA gets on CPU (padding runs included)."""
    from modeling.llm.attention import AttentionMask

    segment_ids = torch.tensor([[1] * 5 + [2] * 3 + [3] * 4, [1] * 9 + [0] * 3, [4] * 12])
    batch, seq_len = segment_ids.shape
    block = AttentionMask.build(
        "sdpa", batch, seq_len, 0, segment_ids, torch.device("cpu"), torch.float32
    ).mask
    reference = torch.block_diag(*block[:, 0])
    varlen = AttentionMask.packed("torch", batch, seq_len, segment_ids, torch.device("cpu"))
    lengths = varlen.cu_seqlens.diff().tolist()
    from_varlen = torch.block_diag(*(torch.ones(n, n, dtype=torch.bool).tril() for n in lengths))
    assert varlen.cu_seqlens[-1] == batch * seq_len and varlen.max_seqlen == max(lengths)
    assert torch.equal(from_varlen, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_varlen_attention_matches_sdpa(seed_everything, backend):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    model = _model(attention_backend="sdpa").cuda().to(torch.bfloat16)
    flash = _model(attention_backend=backend).cuda().to(torch.bfloat16)
    flash.load_state_dict(model.state_dict())
    input_ids = torch.randint(0, VOCAB, (2, 12), device="cuda")
    segment_ids = torch.tensor([[1] * 5 + [2] * 3 + [3] * 4, [1] * 9 + [0] * 3], device="cuda")
    with torch.no_grad():
        for segments in (segment_ids, None):
            reference = model(input_ids=input_ids, segment_ids=segments).logits.float()
            result = flash(input_ids=input_ids, segment_ids=segments).logits.float()
            torch.testing.assert_close(result, reference, atol=2e-2, rtol=2e-2)
