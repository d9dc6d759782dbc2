"""Tensor parallelism (tp = 2, megatron-core layers over gloo on CPU) against the tp = 1 model with the same weights.

Two processes are spawned; each builds the tp = 2 model from the tp = 1 checkpoint, and the test compares the
logits, the gathered gradients and the gathered (re-saved) weights with the tp = 1 model's.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from modeling.llm import DecoderLM, LLMConfig

CONFIGS = {
    "gqa_tied_bias": dict(num_heads=4, num_kv_heads=2, tie_embeddings=True, qkv_bias=True),
    "mha_untied": dict(num_heads=4, num_kv_heads=4, tie_embeddings=False, qkv_bias=False),
}


def _config(name: str, tp: int = 1) -> LLMConfig:
    return LLMConfig(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        intermediate_size=64,
        init_std=0.2,
        tensor_parallel_size=tp,
        **CONFIGS[name],
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 96, (2, 12), generator=generator)
    segment_ids = torch.tensor([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    return input_ids, segment_ids


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return (logits.float().log_softmax(-1)[..., 3] * torch.linspace(-1, 1, logits.shape[1])).sum()


def _worker(rank: int, world: int, port: int, root: str) -> None:
    from modeling.llm.megatron_compat import initialize_tensor_parallel
    from modeling.llm.tensor_parallel import gather_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    initialize_tensor_parallel(world)
    input_ids, segment_ids = _batch()
    for name in CONFIGS:
        model = DecoderLM.from_pretrained(os.path.join(root, name, "tp1"), tensor_parallel_size=world)
        logits = model(input_ids=input_ids, segment_ids=segment_ids).logits
        _loss(logits).backward()
        grads = gather_state_dict({n: p.grad for n, p in model.named_parameters()}, world)
        model.save_pretrained(os.path.join(root, name, "tp2_resaved"))
        if rank == 0:
            torch.save({"logits": logits.detach(), "grads": grads}, os.path.join(root, name, "tp2.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_tp1_logits_grads_and_weights(tmp_path):
    torch.manual_seed(0)
    input_ids, segment_ids = _batch()
    reference = {}
    for name in CONFIGS:
        model = DecoderLM(_config(name))
        model.save_pretrained(tmp_path / name / "tp1")
        logits = model(input_ids=input_ids, segment_ids=segment_ids).logits
        _loss(logits).backward()
        reference[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    for name, (ref_logits, ref_grads) in reference.items():
        result = torch.load(tmp_path / name / "tp2.pt")
        assert ref_logits.std() > 0.1  # non-trivial logits, so a wrong shard layout would show
        torch.testing.assert_close(result["logits"], ref_logits, atol=1e-5, rtol=1e-5)
        assert set(result["grads"]) == set(ref_grads)
        for param, grad in ref_grads.items():
            torch.testing.assert_close(result["grads"][param], grad, atol=1e-5, rtol=1e-4, msg=param)
        saved = load_file(tmp_path / name / "tp1" / "model.safetensors")
        resaved = load_file(tmp_path / name / "tp2_resaved" / "model.safetensors")
        assert saved.keys() == resaved.keys()
        for key in saved:
            torch.testing.assert_close(resaved[key], saved[key], atol=0, rtol=0, msg=key)


def test_tp_config_rejects_indivisible_shapes():
    with pytest.raises(ValueError, match="num_kv_heads.*tensor_parallel_size"):
        LLMConfig(num_heads=4, num_kv_heads=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="vocab_size"):
        LLMConfig(vocab_size=97, num_heads=4, num_kv_heads=2, tensor_parallel_size=2)
