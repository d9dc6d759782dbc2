"""The whole ETT model in transformers (issue 18): an export of a 2-rank ZeRO-3 checkpoint (tied Llama-type LLM,
visual head; fp32 with small LLM shards, and bf16) and an in-process export of the `index` baseline (chat_sft,
Qwen2-type LLM) are loaded with AutoModel* / AutoProcessor (trust_remote_code=True) in ONE child process that
cannot import this repository; it makes the calls lmms-eval's generic chat model makes and saves what it got.
The tests compare that with training.infer on the same exports."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.layouts import caption_prompt
from tests.tiny_configs import stage_config
from training.export import export_checkpoint, run_config_from_dict, write_export
from training.infer import caption, generate_image, load_export, load_image, reconstruct

PROMPTS = ["the letters", None, "two green glyphs on a"]
IMAGE_SIZES = [(70, 40), (30, 30), (50, 64)]
MAX_NEW_TOKENS = 10
T2I = {"prompt": "a red square", "guidance_scale": 3.0, "seed": 7}
T2I_FILTERED = {"prompt": "two glyphs", "guidance_scale": 2.0, "seed": 3, "top_k": 4, "top_p": 0.9}

CHILD = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

try:
    import training
    repo_importable = True
except ImportError:
    repo_importable = False
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])  # the parent's: CPU convolutions round differently per thread count
results = {"repo_importable": repo_importable}


def messages(prompt):
    content = [{"type": "image", "url": "unused"}] + ([{"type": "text", "text": prompt}] if prompt else [])
    return [{"role": "user", "content": content}]


def errors(call):
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


for name, export in job["exports"].items():
    out = results[name] = {}
    images = [Image.open(path) for path in job["images"]]
    # lmms-eval's chat/huggingface.py: AutoConfig, then AutoModel (model_type "ett" is not in transformers'
    # AutoModelForImageTextToText mapping), AutoProcessor, AutoTokenizer, apply_chat_template(tokenize=False),
    # processor(text=, images=, videos=[], audios=[], padding_side="left"), generate(**inputs, ...), batch_decode.
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    if name == "fp32":
        out["auto_image_text_to_text"] = type(
            AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True)
        ).__name__
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    out["model_type"], out["model_class"] = config.model_type, type(model).__name__
    out["dtypes"] = [str(model.language_model.dtype), str(model.vision_tokenizer.codebook.dtype)]

    def generate(prompts, imgs):
        texts = [processor.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]
        inputs = processor(text=texts, images=imgs, videos=[], audios=[], padding=True, padding_side="left",
                           return_tensors="pt")
        cont = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              do_sample=False, temperature=None, top_p=None, num_beams=1,
                              max_new_tokens=job["max_new_tokens"], use_cache=True)
        trimmed = [o[len(i):] for i, o in zip(inputs.input_ids, cont)]
        text = processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return inputs, [t.tolist() for t in trimmed], text

    inputs, single, _ = generate(job["prompts"][:1], images[:1])
    out["single"] = single[0]
    out["single_input_ids"] = inputs.input_ids[0].tolist()
    out["pixel_values"] = inputs.pixel_values
    logits = model(**inputs).logits
    out["forward_next_token"] = int(logits[0, -1].argmax())
    if name == "bf16":
        continue
    out["one_by_one"] = [generate([p], [im])[1][0] for p, im in zip(job["prompts"], images)]
    batch_inputs, out["batched"], out["batched_text"] = generate(job["prompts"], images)
    out["batch_attention_mask"] = batch_inputs.attention_mask.tolist()
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    out["all_pixel_values"] = pixels
    out["codes"] = model.encode_images(pixels)
    out["reconstruction"] = model.decode_codes(out["codes"])
    if config.visual_head:
        for key in ("t2i", "t2i_filtered"):
            spec = dict(job[key])
            ids = processor.text_to_image_inputs(spec.pop("prompt"))
            image, codes = model.generate_images(ids.input_ids, ids.unconditional_ids, **spec)
            out[key] = {"image": image, "codes": codes}
    text = processor.apply_chat_template(messages(job["prompts"][0]), tokenize=False, add_generation_prompt=True)
    wrong_size = torch.zeros(1, 3, 32, 32)
    ids = processor(text=[text], images=images[:1]).input_ids
    out["wrong_size_error"] = errors(lambda: model.generate(input_ids=ids, pixel_values=wrong_size))
    out["too_many_images_error"] = errors(lambda: processor(text=[text], images=images[:2]))
    out["images_without_spans_error"] = errors(
        lambda: model.generate(input_ids=ids, pixel_values=torch.cat([inputs.pixel_values] * 2))
    )
torch.save(results, job["out"])
"""


def _write_images(root) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate(IMAGE_SIZES):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def exports(tiny_data, ett_zero3_run, tmp_path_factory):
    """fp32 and bf16 exports of the shared 2-rank ZeRO-3 `ett` run with a visual head (tests/conftest.py), and an
    in-process export of a random chat_sft model with the `index` visual input."""
    from training.stages import build_model

    root = tmp_path_factory.mktemp("hf_ett")
    checkpoints = ett_zero3_run / "run" / "checkpoints"
    out = {
        "fp32": export_checkpoint(checkpoints, root / "fp32", max_shard_size="40KB"),
        "bf16": export_checkpoint(checkpoints, root / "bf16", dtype="bf16"),
    }
    index_sections = {
        "stage": {"kind": "chat_sft", "init_from": str(root)},
        "model": {"llm": {"qkv_bias": True}, "ett": {"visual_input": "index"}},
    }
    index_cfg = run_config_from_dict(
        stage_config("chat_sft", tiny_data, root / "run_index", **index_sections)
    )
    index_model = build_model(index_cfg)
    index_state = {k: v for k, v in index_model.state_dict().items() if not k.startswith("vq_loss.")}
    out["index"] = write_export(index_state, index_cfg, root / "index", {"stage": "chat_sft", "step": 0})
    return root, out


@pytest.fixture(scope="module")
def child(exports):
    """What the child process (no repository on sys.path, cwd a temporary directory) got from transformers."""
    root, paths = exports
    images = _write_images(root)
    job = {
        "exports": {name: str(path) for name, path in paths.items()},
        "images": [str(p) for p in images],
        "prompts": PROMPTS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "t2i": T2I,
        "t2i_filtered": T2I_FILTERED,
        "out": str(root / "child.pt"),
        "threads": torch.get_num_threads(),
    }
    (root / "job.json").write_text(json.dumps(job))
    (root / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(root / "hf_modules"))
    cwd = root / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-P", str(root / "child.py"), str(root / "job.json")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = torch.load(root / "child.pt", weights_only=False)
    loaded = {name: load_export(path) for name, path in paths.items() if name != "bf16"}
    return {"results": results, "loaded": loaded, "images": images, "paths": paths}


def _reference_caption(loaded, image_path, prompt) -> list[int]:
    """training.infer caption --greedy, as token ids, cut like the child's (EOS kept, nothing after it)."""
    tokens = caption(loaded, load_image(image_path, loaded.image_size), prompt, MAX_NEW_TOKENS, greedy=True)
    return tokens + [loaded.text_tokenizer.eos_id] if len(tokens) < MAX_NEW_TOKENS else tokens


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_child_cannot_import_the_repository_and_gets_our_classes(child):
    results = child["results"]
    assert results["repo_importable"] is False
    for name in ("fp32", "bf16", "index"):
        assert results[name]["model_type"] == "ett"
        assert results[name]["model_class"] == "ETTForConditionalGeneration"
    assert results["fp32"]["auto_image_text_to_text"] == "ETTForConditionalGeneration"


@pytest.mark.parametrize("name", ["fp32", "index"])
def test_greedy_caption_is_training_infers(child, name):
    loaded, out = child["loaded"][name], child["results"][name]
    expected = _reference_caption(loaded, child["images"][0], PROMPTS[0])
    assert out["single"] == expected
    assert len(expected) > 1
    chat = name == "index"
    assert out["single_input_ids"] == caption_prompt(
        loaded.text_tokenizer, loaded.grid, PROMPTS[0], chat=chat
    )
    assert out["forward_next_token"] == expected[0]
    assert torch.equal(out["pixel_values"], load_image(child["images"][0], loaded.image_size))


@pytest.mark.parametrize("name", ["fp32", "index"])
def test_left_padded_batch_gives_the_one_by_one_captions(child, name):
    loaded, out = child["loaded"][name], child["results"][name]
    eos = loaded.text_tokenizer.eos_id
    expected = [_reference_caption(loaded, path, prompt) for path, prompt in zip(child["images"], PROMPTS)]
    assert out["one_by_one"] == expected
    assert [_until_eos(tokens, eos) for tokens in out["batched"]] == expected
    masks = out["batch_attention_mask"]
    assert len({sum(mask) for mask in masks}) == len(masks)  # three prompt lengths: left padding was needed
    assert all(mask[-1] == 1 for mask in masks)
    assert out["batched_text"][0] == loaded.text_tokenizer.decode(expected[0])


@pytest.mark.parametrize("name", ["fp32", "index"])
def test_decode_of_encode_is_training_infer_reconstruct(child, name):
    loaded, out = child["loaded"][name], child["results"][name]
    images = torch.cat([load_image(path, loaded.image_size) for path in child["images"]])
    assert torch.equal(out["all_pixel_values"], images)
    assert torch.equal(out["codes"], loaded.model.tokenizer.encode(images))
    assert torch.equal(out["reconstruction"], reconstruct(loaded, images))


@pytest.mark.parametrize("spec", ["t2i", "t2i_filtered"])
def test_generate_images_is_training_infer_generate(child, spec):
    loaded, out = child["loaded"]["fp32"], child["results"]["fp32"][spec]
    options = dict(T2I if spec == "t2i" else T2I_FILTERED)
    image, codes = generate_image(loaded, options.pop("prompt"), **options)
    assert torch.equal(out["codes"][0], codes)
    assert torch.equal(out["image"][0], image)


def test_bf16_export_loads_and_generates(child):
    out = child["results"]["bf16"]
    assert out["dtypes"] == ["torch.bfloat16", "torch.float32"]  # the vision tokenizer stays fp32
    assert len(out["single"]) > 0
    config = json.loads((child["paths"]["bf16"] / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_wrong_image_size_and_extra_images_are_rejected(child):
    out = child["results"]["fp32"]
    assert "pixel_values has shape [1, 3, 32, 32], expected [M, 3, 24, 48]" in out["wrong_size_error"]
    assert "got 2 images for 1 image placeholders" in out["too_many_images_error"]
    assert "pixel_values has 2 images" in out["images_without_spans_error"]


def test_export_has_the_transformers_files(child):
    export = child["paths"]["fp32"]
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    files = set(index.values())
    assert "vision.safetensors" in files and any(f.startswith("language_model-") for f in files)
    assert any(k.startswith("visual_head.") for k in index) and any(k.startswith("projector.") for k in index)
    assert any(
        k.startswith("index_embedding.")
        for k in json.loads((child["paths"]["index"] / "model.safetensors.index.json").read_text())[
            "weight_map"
        ]
    )
    for name in (
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
        "tokenizer.json",
    ):
        assert (export / name).is_file(), name
    for path in export.glob("*.py"):
        imports = {
            line.split()[1].split(".")[0]
            for line in path.read_text().splitlines()
            if line.startswith(("import ", "from ")) and not line.startswith("from .")
        }
        assert imports <= {
            "torch",
            "transformers",
            "__future__",
            "abc",
            "dataclasses",
            "typing",
            "json",
            "pathlib",
            "re",
            "math",
            "os",
            "importlib",
            "safetensors",
        }, (path.name, imports)
