"""Inference from an export (issue 8): KV-cached sampling checked against naive full-recompute references,
captioning against transformers' own generate, and the t2i grid format. The export here is written in-process
from a random model (Qwen2-type untied LLM; tests/test_export.py covers exports of a real ZeRO-3 checkpoint)."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.generation_t2i import T2ISamplingConfig, sample_image_codes
from tests.tiny_configs import stage_config
from training.export import run_config_from_dict, write_export
from training.infer import caption, caption_prefix, generate_image, load_export, load_image, t2i_prompts
from training.infer import main as infer


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    from training.stages import build_model

    root = tmp_path_factory.mktemp("infer")
    sections = {
        "stage": {"kind": "t2i", "init_from": str(root)},
        "model": {"llm": {"qkv_bias": True, "tie_embeddings": False}, "ett": {"visual_head": True}},
    }
    cfg = run_config_from_dict(stage_config("t2i", tiny_data, root / "run", **sections))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a peaked visual head, so that sampling choices depend on the context
        model.visual_head.weight.mul_(20.0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vq_loss.")}
    export = write_export(state, cfg, root / "export", {"stage": "t2i", "kind": "t2i", "step": 0})
    return {"export": export, "state": state, "loaded": load_export(export), "data": tiny_data}


def test_load_export_gives_back_every_tensor(exported):
    loaded_state = exported["loaded"].model.state_dict()
    assert set(loaded_state) == set(exported["state"])
    for key, value in exported["state"].items():
        assert torch.equal(loaded_state[key], value), key


def test_exported_qwen2_tokenizer_loads_with_transformers(exported):
    """transformers 5 gives model_type qwen2 its own tokenizer class in AutoTokenizer; the generic fast tokenizer
    class reads our tokenizer.json exactly."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(exported["export"] / "llm")
    text = "two green glyphs"
    assert hf.encode(text, add_special_tokens=False) == exported["loaded"].text_tokenizer.encode(text)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 24, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_greedy_caption_matches_transformers_generate(exported):
    from transformers import AutoModelForCausalLM

    loaded = exported["loaded"]
    prefix = caption_prefix(loaded, _image(), prompt="the letters")
    ours = caption(loaded, _image(), prompt="the letters", max_new_tokens=12, greedy=True)
    hf = AutoModelForCausalLM.from_pretrained(exported["export"] / "llm", dtype=torch.float32)
    eos = loaded.text_tokenizer.eos_id
    reference = hf.generate(
        inputs_embeds=prefix, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )[0].tolist()
    reference = reference[: reference.index(eos)] if eos in reference else reference
    assert ours == reference
    assert len(ours) > 0


def test_sampled_caption_is_reproducible_per_seed(exported):
    loaded = exported["loaded"]
    runs = [
        caption(loaded, _image(), max_new_tokens=10, greedy=False, temperature=5.0, seed=s) for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def _reference_sampling(model, cond, uncond, grid, row_end_id, scale, temperature, seed, forced=None):
    """Naive sampler: the whole sequence is re-run for every code (no KV cache); codes enter as
    projector(codebook row); ROW_END after every row. Returns (codes [h, w], the scaled guided logits of every
    step). With `forced` codes [h, w] it feeds those instead of its own samples (teacher forcing)."""
    generator = torch.Generator().manual_seed(seed)
    contexts = [model.llm.embed_tokens(cond)] + ([model.llm.embed_tokens(uncond)] if scale != 1 else [])
    row_end = model.llm.embed_tokens(torch.tensor([[row_end_id]]))
    codes, step_logits = torch.empty(grid, dtype=torch.long), []
    with torch.no_grad():
        for row in range(grid[0]):
            for col in range(grid[1]):
                logits = [
                    model.visual_head(model.llm(inputs_embeds=c).hidden_states[:, -1]) for c in contexts
                ]
                mixed = logits[0] if scale == 1 else logits[1] + scale * (logits[0] - logits[1])
                step_logits.append(mixed.float() / temperature)
                code = torch.multinomial(torch.softmax(step_logits[-1], dim=-1), 1, generator=generator)[0, 0]
                codes[row, col] = code if forced is None else forced[row, col]
                embed = model.projector(model.tokenizer.codebook[codes[row, col]])[None, None]
                contexts = [torch.cat([c, embed], dim=1) for c in contexts]
            contexts = [torch.cat([c, row_end], dim=1) for c in contexts]
    return codes, torch.cat(step_logits)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_guided_sampling_matches_naive_reference(exported, scale, monkeypatch):
    """Same codes as the naive sampler for the same seed, and at every step the logits sampled from are
    (l_uncond + s (l_cond - l_uncond)) / T of a full re-run."""
    import modeling.generation_t2i as t2i

    loaded = exported["loaded"]
    cond, uncond = t2i_prompts(loaded, "blue letters")
    row_end = loaded.text_tokenizer.row_end_id
    seen, sample = [], t2i.sample
    monkeypatch.setattr(t2i, "sample", lambda logits, *args: seen.append(logits) or sample(logits, *args))
    sampling = T2ISamplingConfig(guidance_scale=scale, temperature=2.0)
    codes = sample_image_codes(
        loaded.model, cond, loaded.grid, row_end, sampling, uncond, torch.Generator().manual_seed(4)
    )
    reference, _ = _reference_sampling(loaded.model, cond, uncond, loaded.grid, row_end, scale, 2.0, seed=4)
    assert torch.equal(codes, reference)
    _, forced_logits = _reference_sampling(
        loaded.model, cond, uncond, loaded.grid, row_end, scale, 2.0, seed=4, forced=codes
    )
    torch.testing.assert_close(torch.cat(seen), forced_logits, rtol=0, atol=1e-5)


def test_guidance_scale_one_equals_unguided_sampling(exported):
    """Scale 1 ignores the unconditional context entirely (it is never run); a larger scale changes the image."""
    loaded = exported["loaded"]
    cond, uncond = t2i_prompts(loaded, "blue letters")
    row_end = loaded.text_tokenizer.row_end_id

    def sample(scale, unconditional):
        return sample_image_codes(
            loaded.model,
            cond,
            loaded.grid,
            row_end,
            T2ISamplingConfig(guidance_scale=scale),
            unconditional,
            torch.Generator().manual_seed(11),
        )

    unguided = sample(1.0, None)
    assert torch.equal(sample(1.0, uncond), unguided)
    assert not torch.equal(sample(50.0, uncond), unguided)


def test_fixed_seed_reproduces_the_image(exported):
    loaded = exported["loaded"]
    first, codes = generate_image(loaded, "red letters", guidance_scale=2.0, seed=3, top_k=10, top_p=0.9)
    again, codes_again = generate_image(
        loaded, "red letters", guidance_scale=2.0, seed=3, top_k=10, top_p=0.9
    )
    _, other = generate_image(loaded, "red letters", guidance_scale=2.0, seed=4, top_k=10, top_p=0.9)
    assert torch.equal(first, again) and torch.equal(codes, codes_again)
    assert not torch.equal(codes, other)


def test_generated_grid_is_well_formed(exported):
    """h rows of w codes in [0, K); the LLM is fed exactly the t2i span: each code but the very last, ROW_END after
    every row but the last (the image's IMAGE_END follows the last row and needs no forward pass)."""
    loaded = exported["loaded"]
    fed = []

    def record(module, args, kwargs):
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        fed.append(("ids", ids[0].tolist()) if ids is not None else ("code", tuple(embeds.shape)))

    handle = loaded.model.llm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        image, codes = generate_image(loaded, "red letters", guidance_scale=1.0, seed=0)
    finally:
        handle.remove()
    height, width = loaded.grid
    assert codes.shape == (height, width) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < loaded.config.model.tokenizer.codebook_size
    assert image.shape == (3, *loaded.image_size)
    cond, _ = t2i_prompts(loaded, "red letters")
    tok = loaded.text_tokenizer
    assert cond[0, 0] == tok.bos_id and cond[0, -1] == tok.image_start_id
    row_end = ("ids", [tok.row_end_id])
    code = ("code", (1, 1, loaded.config.model.llm.hidden_size))
    expected = (
        [("ids", cond[0].tolist())] + ([code] * width + [row_end]) * (height - 1) + [code] * (width - 1)
    )
    assert fed == expected


def test_infer_cli_reports_bad_input(exported, tmp_path, capsys):
    export = str(exported["export"])
    assert (
        infer(["reconstruct", "--export", export, "--image", str(tmp_path / "no.png"), "--out", "x.png"]) == 2
    )
    assert "no.png not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert infer(["caption", "--export", export, "--image", str(tmp_path / "bad.png")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err
    args = ["generate", "--export", export, "--prompt", "x", "--out", str(tmp_path / "g.png")]
    assert infer([*args, "--guidance-scale", "0.5"]) == 2
    assert "guidance_scale must be >= 1" in capsys.readouterr().err
    assert infer(["caption", "--export", str(tmp_path), "--image", "x.png"]) == 2
    assert "ett_config.json" in capsys.readouterr().err


def test_generate_needs_a_visual_head(exported, tmp_path, capsys):
    from training.config import to_dict

    state = {k: v for k, v in exported["state"].items() if not k.startswith("visual_head.")}
    cfg = run_config_from_dict(to_dict(exported["loaded"].config))
    cfg.model.ett.visual_head = False
    export = write_export(state, cfg, tmp_path / "no_head", {"stage": "ett"})
    Image.fromarray(np.zeros((24, 48, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    args = ["generate", "--export", str(export), "--prompt", "x", "--out", str(tmp_path / "g.png")]
    assert infer(args) == 2
    assert "visual_head" in capsys.readouterr().err
    loaded = load_export(export)
    assert caption(loaded, load_image(tmp_path / "in.png", loaded.image_size), max_new_tokens=3) is not None
