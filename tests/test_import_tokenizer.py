"""training/import_tokenizer.py against independent references: transformers' JanusVQVAE (outputs), a state dict
in SEED-Voken's IBQ layout built here from SEED-Voken's constructor logic (keys, shapes, strictness), a 2-rank
ZeRO-3 load (weights), and a codebook resize measured here (kept codes, unchanged indices)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from modeling.tokenizer import PatchDiscriminator, VQLossConfig, VQTokenizer
from tests.conftest import REPO_ROOT, child_env
from tests.tiny_configs import stage_config
from training.engine import free_port
from training.import_tokenizer import TokenizerImportError, import_tokenizer, main

# ---------------------------------------------------------------------------------------------- Janus (transformers)


def _tiny_janus(tmp_path, seed: int = 0):
    from transformers import JanusVQVAE, JanusVQVAEConfig

    config = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 2],
        num_res_blocks=1,
        num_patches=4,
        projection_dim=16,
        image_token_embed_dim=16,
    )
    torch.manual_seed(seed)
    model = JanusVQVAE(config).eval()
    with torch.no_grad():  # perturb every weight (norm scales, biases too) so that no layer is an identity
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.quantize.embedding.weight.mul_(20.0)  # codes far from unit norm: the L2 normalisation matters
    model.save_pretrained(tmp_path / "janus")
    return model


def test_janus_import_matches_transformers(tmp_path):
    ref = _tiny_janus(tmp_path)
    summary = import_tokenizer("janus-hf", tmp_path / "janus", tmp_path / "out")
    assert summary["not_imported"] == {}
    ours = VQTokenizer.from_pretrained(tmp_path / "out").eval()
    assert ours.config.quantizer == "vq" and ours.config.vq_output_l2_normalize
    torch.manual_seed(1)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(images)
        features = ours.encoder(images)
        torch.testing.assert_close(features, expected.last_hidden_state, atol=1e-5, rtol=0)
        indices = ours.encode(images)
        assert torch.equal(indices.reshape(3, -1), expected.image_tokens.reshape(3, -1))
        decoded_ref = ref.decode(expected.image_tokens.reshape(3, -1))
        torch.testing.assert_close(ours.decode_indices(indices), decoded_ref, atol=1e-5, rtol=0)
        # the full forward (encode, quantise, decode) too
        torch.testing.assert_close(
            ours(images).reconstruction, ref(images).decoded_pixel_values, atol=1e-5, rtol=0
        )
        # and the normalisation is what makes it match: the raw codes decode to something else
        raw = ours.decode(ours.quantizer.embedding(indices).permute(0, 3, 1, 2))
        assert (raw - decoded_ref).abs().max() > 1e-3


def test_janus_wrong_shape_is_named(tmp_path):
    from safetensors.torch import save_file

    _tiny_janus(tmp_path)
    path = tmp_path / "janus" / "model.safetensors"
    state = load_file(str(path))
    state["decoder.up.0.block.0.conv1.weight"] = state["decoder.up.0.block.0.conv1.weight"][
        :, :16
    ].contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(TokenizerImportError) as err:
        import_tokenizer("janus-hf", tmp_path / "janus", tmp_path / "out")
    message = str(err.value)
    assert "decoder.up.0.block.0.conv1.weight" in message and str(path) in message
    assert "expected [64, 64, 3, 3], found [64, 16, 3, 3]" in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- SEED-Voken IBQ layout

DDCONFIG = {
    "double_z": False,
    "z_channels": 32,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}
N_EMBED, EMBED_DIM = 64, 8


def _resnet(prefix: str, cin: int, cout: int) -> dict:
    shapes = {
        f"{prefix}.norm1.weight": [cin],
        f"{prefix}.norm1.bias": [cin],
        f"{prefix}.conv1.weight": [cout, cin, 3, 3],
        f"{prefix}.conv1.bias": [cout],
        f"{prefix}.norm2.weight": [cout],
        f"{prefix}.norm2.bias": [cout],
        f"{prefix}.conv2.weight": [cout, cout, 3, 3],
        f"{prefix}.conv2.bias": [cout],
    }
    if cin != cout:
        shapes.update(
            {f"{prefix}.nin_shortcut.weight": [cout, cin, 1, 1], f"{prefix}.nin_shortcut.bias": [cout]}
        )
    return shapes


def _attn(prefix: str, c: int) -> dict:
    shapes = {f"{prefix}.norm.weight": [c], f"{prefix}.norm.bias": [c]}
    for name in ("q", "k", "v", "proj_out"):
        shapes.update({f"{prefix}.{name}.weight": [c, c, 1, 1], f"{prefix}.{name}.bias": [c]})
    return shapes


def ibq_model_shapes(dd: dict = DDCONFIG) -> dict[str, list[int]]:
    """Keys and shapes of SEED-Voken's IBQ encoder/decoder/quantizer, following the constructors of
    src/IBQ/modules/diffusionmodules/model.py (Encoder: down[i].block/attn/downsample; Decoder: up[i] prepended,
    so up[i] is resolution level i) and models/ibqgan.py (quant_conv, quantize.embedding, post_quant_conv)."""
    ch, mult, nrb, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    n = len(mult)
    shapes = {"encoder.conv_in.weight": [ch, dd["in_channels"], 3, 3], "encoder.conv_in.bias": [ch]}
    res, in_mult = dd["resolution"], (1, *mult)
    for i in range(n):
        block_in = ch * in_mult[i]
        for j in range(nrb):
            shapes.update(_resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult[i]))
            block_in = ch * mult[i]
            if res in dd["attn_resolutions"]:
                shapes.update(_attn(f"encoder.down.{i}.attn.{j}", block_in))
        if i != n - 1:
            shapes.update({f"encoder.down.{i}.downsample.conv.weight": [block_in, block_in, 3, 3]})
            shapes.update({f"encoder.down.{i}.downsample.conv.bias": [block_in]})
            res //= 2
    for part, c in (("encoder", ch * mult[-1]), ("decoder", ch * mult[-1])):
        shapes.update(_resnet(f"{part}.mid.block_1", c, c))
        shapes.update(_attn(f"{part}.mid.attn_1", c))
        shapes.update(_resnet(f"{part}.mid.block_2", c, c))
    shapes.update({"encoder.norm_out.weight": [ch * mult[-1]], "encoder.norm_out.bias": [ch * mult[-1]]})
    shapes.update({"encoder.conv_out.weight": [z, ch * mult[-1], 3, 3], "encoder.conv_out.bias": [z]})
    block_in = ch * mult[-1]
    shapes.update({"decoder.conv_in.weight": [block_in, z, 3, 3], "decoder.conv_in.bias": [block_in]})
    res = dd["resolution"] // 2 ** (n - 1)
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            shapes.update(_resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i]))
            block_in = ch * mult[i]
            if res in dd["attn_resolutions"]:
                shapes.update(_attn(f"decoder.up.{i}.attn.{j}", block_in))
        if i != 0:
            shapes.update({f"decoder.up.{i}.upsample.conv.weight": [block_in, block_in, 3, 3]})
            shapes.update({f"decoder.up.{i}.upsample.conv.bias": [block_in]})
            res *= 2
    shapes.update({"decoder.norm_out.weight": [ch], "decoder.norm_out.bias": [ch]})
    shapes.update({"decoder.conv_out.weight": [3, ch, 3, 3], "decoder.conv_out.bias": [3]})
    shapes.update({"quant_conv.weight": [EMBED_DIM, z, 1, 1], "quant_conv.bias": [EMBED_DIM]})
    shapes.update({"post_quant_conv.weight": [z, EMBED_DIM, 1, 1], "post_quant_conv.bias": [z]})
    shapes["quantize.embedding.weight"] = [N_EMBED, EMBED_DIM]
    return shapes


def nlayer_discriminator(ndf: int = 8, n_layers: int = 2) -> nn.Sequential:
    """pix2pix NLayerDiscriminator with BatchNorm (SEED-Voken src/IBQ/modules/discriminator/model.py)."""
    seq: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        seq += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2),
        ]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [
        nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
        nn.BatchNorm2d(ndf * mult),
        nn.LeakyReLU(0.2),
    ]
    seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*seq)


def write_ibq_checkpoint(path, ema: bool = True, seed: int = 0, mutate=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: 0.1 * torch.randn(s, generator=gen) for k, s in ibq_model_shapes().items()}
    state["quantize.embedding.weight"] = torch.randn(N_EMBED, EMBED_DIM, generator=gen)
    state.update({f"loss.discriminator.main.{k}": v for k, v in nlayer_discriminator().state_dict().items()})
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3, generator=gen)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1, generator=gen)
    if ema:
        for key in list(state):
            if (
                not key.startswith("loss.perceptual_loss.")
                and "running_" not in key
                and "num_batches" not in key
            ):
                state["model_ema." + key.replace(".", "")] = state[key] + 1.0
        state["model_ema.decay"] = torch.tensor(0.999)
        state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int)
    if mutate:
        mutate(state)
    hyper = {
        "ddconfig": DDCONFIG,
        "lossconfig": {
            "target": "src.IBQ.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {
                "disc_start": 0,
                "entropy_loss_weight": 0.05,
                "gen_loss_weight": 0.1,
                "disc_num_layers": 2,
            },
        },
        "n_embed": N_EMBED,
        "embed_dim": EMBED_DIM,
        "use_entropy_loss": True,
        "use_ema": ema,
    }
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": hyper,
            "optimizer_states": [{}],
            "epoch": 1,
            "global_step": 5,
        },
        str(path),
    )
    return state


def test_ibq_layout_imports_strictly(tmp_path):
    source = write_ibq_checkpoint(tmp_path / "ibq.ckpt")
    summary = import_tokenizer("seed-voken-ibq", tmp_path / "ibq.ckpt", tmp_path / "out")
    model_keys = [
        k
        for k in source
        if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize")
    ]
    assert summary["source_keys_used"] == len(model_keys) == len(ibq_model_shapes())
    not_imported = summary["not_imported"]
    assert sorted(k for keys in not_imported.values() for k in keys) == sorted(
        k for k in source if k.startswith(("model_ema.", "loss.perceptual_loss."))
    )
    assert summary["checkpoint_entries_not_imported"] == [
        "epoch",
        "global_step",
        "optimizer_states",
    ]
    assert summary["discriminator"].startswith("imported")

    tok = VQTokenizer.from_pretrained(tmp_path / "out")
    cfg = tok.config
    assert (cfg.quantizer, cfg.codebook_size, cfg.code_dim, cfg.base_channels) == (
        "ibq",
        N_EMBED,
        EMBED_DIM,
        32,
    )
    assert cfg.loss.entropy_weight == 0.05 and cfg.loss.disc_norm == "batch" and cfg.loss.disc_layers == 2
    ours = tok.state_dict()
    # the mapping, spelled out on a few keys of each kind
    assert torch.equal(
        ours["encoder.levels.0.blocks.0.conv1.weight"], source["encoder.down.0.block.0.conv1.weight"]
    )
    assert torch.equal(
        ours["encoder.levels.0.resample.conv.bias"], source["encoder.down.0.downsample.conv.bias"]
    )
    qkv = torch.cat([source[f"encoder.down.1.attn.0.{p}.weight"] for p in "qkv"])
    assert torch.equal(ours["encoder.levels.1.attns.0.qkv.weight"], qkv)
    assert torch.equal(
        ours["decoder.levels.0.blocks.1.conv2.weight"], source["decoder.up.1.block.1.conv2.weight"]
    )
    assert torch.equal(
        ours["decoder.levels.0.resample.conv.weight"], source["decoder.up.1.upsample.conv.weight"]
    )
    assert torch.equal(
        ours["decoder.levels.1.blocks.0.nin_shortcut.weight"],
        source["decoder.up.0.block.0.nin_shortcut.weight"],
    )
    assert torch.equal(ours["quantizer.embedding.weight"], source["quantize.embedding.weight"])
    disc = PatchDiscriminator(VQLossConfig(disc_ndf=8, disc_layers=2, disc_norm="batch"))
    disc.load_state_dict(load_file(str(tmp_path / "out" / "discriminator" / "model.safetensors")))


def test_ibq_ema_weights(tmp_path):
    source = write_ibq_checkpoint(tmp_path / "ibq.ckpt")
    summary = import_tokenizer("seed-voken-ibq", tmp_path / "ibq.ckpt", tmp_path / "out", use_ema=True)
    ours = VQTokenizer.from_pretrained(tmp_path / "out").state_dict()
    assert torch.equal(ours["decoder.conv_out.weight"], source["model_ema.decoderconv_outweight"])
    assert torch.equal(ours["quantizer.embedding.weight"], source["quantize.embedding.weight"] + 1.0)
    skipped = {k for keys in summary["not_imported"].values() for k in keys}
    assert "encoder.conv_in.weight" in skipped and "model_ema.decay" in skipped


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda s: s.update({"decoder.up.1.block.0.conv1.weight": torch.zeros(64, 64, 1, 1)}),
            ["decoder.up.1.block.0.conv1.weight", "expected [64, 64, 3, 3], found [64, 64, 1, 1]"],
        ),
        (
            lambda s: s.update(
                {"encoder.down.0.block.0.conv_1.weight": s.pop("encoder.down.0.block.0.conv1.weight")}
            ),
            [
                "missing",
                "encoder.down.0.block.0.conv1.weight",
                "unexpected",
                "encoder.down.0.block.0.conv_1.weight",
            ],
        ),
        (lambda s: s.pop("encoder.mid.attn_1.k.bias"), ["missing", "encoder.mid.attn_1.k.bias", "[64]"]),
        (lambda s: s.update({"quantize.used": torch.arange(4)}), ["unexpected", "quantize.used"]),
    ],
    ids=["wrong-shape", "renamed", "missing", "extra"],
)
def test_ibq_bad_keys_are_named(tmp_path, mutate, expected):
    write_ibq_checkpoint(tmp_path / "ibq.ckpt", ema=False, mutate=mutate)
    with pytest.raises(TokenizerImportError) as err:
        import_tokenizer("seed-voken-ibq", tmp_path / "ibq.ckpt", tmp_path / "out")
    message = str(err.value)
    assert str(tmp_path / "ibq.ckpt") in message
    for text in expected:
        assert text in message, message


def test_missing_ema_key_is_named(tmp_path):
    write_ibq_checkpoint(tmp_path / "ibq.ckpt", mutate=lambda s: s.pop("model_ema.quant_convweight"))
    with pytest.raises(TokenizerImportError, match=r"missing: .*model_ema\.quant_convweight"):
        import_tokenizer("seed-voken-ibq", tmp_path / "ibq.ckpt", tmp_path / "out", use_ema=True)


def test_command_line(tmp_path, capsys):
    write_ibq_checkpoint(tmp_path / "ibq.ckpt", ema=False)
    out = tmp_path / "out"
    assert main(["--format", "taming", "--input", str(tmp_path / "ibq.ckpt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not imported, LPIPS" in printed and "discriminator: imported" in printed
    assert VQTokenizer.from_pretrained(out).config.quantizer == "vq"
    assert main(["--format", "taming", "--input", str(tmp_path / "nope.ckpt"), "--out", str(out)]) == 2
    assert "nope.ckpt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ZeRO-3

ZERO3_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
from training.config import from_dict
from training.engine import build_ds_config, gather_full_state_dict, init_distributed, model_init_context
from training.run_config import TrainConfig
from training.stages import build_model, load_initial_weights

rank, _, world = init_distributed()
config, weights = json.loads(sys.argv[1]), sys.argv[2]
cfg = from_dict(TrainConfig, config)
ds_config = build_ds_config(cfg, world_size=world)
assert ds_config["zero_optimization"]["stage"] == 3
with model_init_context(ds_config):
    model = build_model(cfg)
partitioned = sum(1 for p in model.parameters() if hasattr(p, "ds_id") and p.numel() < p.ds_numel)
load_initial_weights(model, cfg)
gathered = gather_full_state_dict(model, rank)
if rank == 0:
    plain = build_model(cfg)
    load_initial_weights(plain, cfg)
    plain = plain.state_dict()
    imported = {"tokenizer." + k: v for k, v in load_file(weights).items()}
    differ = sorted(k for k in plain if k not in gathered or not torch.equal(plain[k], gathered[k]))
    differ_file = sorted(k for k in imported if not torch.equal(imported[k], gathered[k]))
    print("RESULT", json.dumps({"world": world, "partitioned": partitioned, "total": len(list(model.parameters())),
                                "compared": len(plain), "differ": differ, "differ_file": differ_file,
                                "keys_equal": sorted(plain) == sorted(imported)}))
"""


def test_import_loads_into_zero3_model(tmp_path):
    write_ibq_checkpoint(tmp_path / "ibq.ckpt", ema=False)
    out = tmp_path / "out"
    import_tokenizer("seed-voken-ibq", tmp_path / "ibq.ckpt", out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    config = stage_config(
        "tokenizer",
        tmp_path,
        tmp_path / "run",
        model={"tokenizer": tok_cfg},
        stage={"init_tokenizer_from": str(out)},
    )
    config["model"]["tokenizer"] = tok_cfg
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = child_env(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", ZERO3_SCRIPT, json.dumps(config), str(out / "model.safetensors")],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    lines = [line for line in outputs[0].splitlines() if line.startswith("RESULT ")]
    assert lines, outputs[0][-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["world"] == 2
    assert result["partitioned"] == result["total"] > 0  # every parameter was partitioned when loaded
    assert result["keys_equal"] and result["compared"] > 0
    assert result["differ"] == [] and result["differ_file"] == []


# ---------------------------------------------------------------------------------------------- codebook resize


def _sample_images(folder, seed: int = 0) -> None:
    """Four flat colours, each repeated (their codes are the most used), and noise images that use many codes."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240)]
    n = 0
    for colour in colours:
        for _ in range(4):
            Image.fromarray(np.full((16, 16, 3), colour, dtype=np.uint8)).save(folder / f"{n:03d}.png")
            n += 1
    for _ in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{n:03d}.png")
        n += 1


def test_codebook_resize_keeps_most_used_codes(tmp_path):
    from data_pipeline.processing import decode_image

    def unit_codes(state):  # a random IBQ codebook of unit rows: more codes in use than raw N(0, 1) rows
        state["quantize.embedding.weight"] = torch.nn.functional.normalize(
            state["quantize.embedding.weight"], dim=-1
        )

    write_ibq_checkpoint(tmp_path / "ibq.ckpt", ema=False, mutate=unit_codes)
    _sample_images(tmp_path / "images")
    full_dir, small_dir = tmp_path / "full", tmp_path / "small"
    import_tokenizer("seed-voken-ibq", tmp_path / "ibq.ckpt", full_dir)
    keep = 8
    summary = import_tokenizer(
        "seed-voken-ibq",
        tmp_path / "ibq.ckpt",
        small_dir,
        codebook_size=keep,
        data=tmp_path / "images",
        data_samples=100,
    )
    full, small = VQTokenizer.from_pretrained(full_dir).eval(), VQTokenizer.from_pretrained(small_dir).eval()
    assert small.config.codebook_size == keep

    # the sample, decoded here, and its code counts under the full codebook
    files = sorted((tmp_path / "images").iterdir())
    images = (
        torch.stack([torch.from_numpy(decode_image(f.read_bytes(), (16, 16))) for f in files]).float() / 127.5
        - 1
    )
    with torch.no_grad():
        before = full.encode(images)
        after = small.encode(images)
    counts = torch.bincount(before.reshape(-1), minlength=N_EMBED)
    kept = torch.tensor(summary["codebook_resize"]["kept_codes"])
    assert len(kept) == keep and torch.equal(kept, kept.sort().values)
    dropped = torch.ones(N_EMBED, dtype=torch.bool)
    dropped[kept] = False
    assert counts[kept].min() >= counts[dropped].max()  # the kept codes are the most used
    assert torch.equal(small.codebook, full.codebook[kept])

    used_before = int((counts > 0).sum())
    assert used_before > keep  # the resize drops used codes
    report = summary["codebook_resize"]
    assert report["before"]["codes_used"] == used_before and report["before"]["codebook_size"] == N_EMBED
    assert report["after"]["codes_used"] <= keep and report["after"]["codebook_size"] == keep
    probs = counts[counts > 0].double() / counts.sum()
    assert report["before"]["perplexity"] == pytest.approx(float(torch.exp(-(probs * probs.log()).sum())))

    old_to_new = torch.full((N_EMBED,), -1, dtype=torch.long)
    old_to_new[kept] = torch.arange(keep)
    only_kept = [i for i in range(len(images)) if bool((old_to_new[before[i]] >= 0).all())]
    assert 0 < len(only_kept) < len(images)
    for i in only_kept:
        assert torch.equal(after[i], old_to_new[before[i]]), f"image {files[i].name}: indices changed"


def test_codebook_resize_reads_arrow_dataset(tmp_path):
    import io

    from data_pipeline.schema import image_segment, text_segment
    from data_pipeline.shards import ShardWriter

    write_ibq_checkpoint(tmp_path / "ibq.ckpt", ema=False)
    with ShardWriter(tmp_path / "data") as writer:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 16, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
            writer.write(
                {
                    "id": str(i),
                    "source": "t",
                    "task": "caption",
                    "segments": [image_segment(buf.getvalue()), text_segment("x")],
                }
            )
    summary = import_tokenizer(
        "seed-voken-ibq",
        tmp_path / "ibq.ckpt",
        tmp_path / "out",
        codebook_size=8,
        data=tmp_path / "data",
        data_samples=4,
    )
    assert summary["codebook_resize"]["images"] == 4
    assert VQTokenizer.from_pretrained(tmp_path / "out").config.codebook_size == 8


def test_config_from_yaml_or_from_weights(tmp_path):
    import yaml

    state = write_ibq_checkpoint(tmp_path / "ibq.ckpt", ema=False)
    torch.save({"state_dict": state}, str(tmp_path / "bare.ckpt"))  # no hyper_parameters
    args = {"ddconfig": DDCONFIG, "n_embed": N_EMBED, "embed_dim": EMBED_DIM, "lossconfig": {"params": {}}}
    (tmp_path / "cfg.yaml").write_text(
        yaml.safe_dump({"model": {"class_path": "src.IBQ.models.ibqgan.IBQ", "init_args": args}})
    )
    import_tokenizer("seed-voken-ibq", tmp_path / "bare.ckpt", tmp_path / "a", config=tmp_path / "cfg.yaml")
    inferred = import_tokenizer("seed-voken-ibq", tmp_path / "bare.ckpt", tmp_path / "b")
    assert any("inferred from the tensor shapes" in note for note in inferred["notes"])
    a, b = VQTokenizer.from_pretrained(tmp_path / "a"), VQTokenizer.from_pretrained(tmp_path / "b")
    assert (a.config.resolution, a.config.attn_resolutions) == (16, (8,))
    assert (b.config.resolution, b.config.attn_resolutions) == (256, (128,))  # same attention level
    assert (a.config.channel_mult, a.config.num_res_blocks) == (
        b.config.channel_mult,
        b.config.num_res_blocks,
    )
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_taming_encoder_decoder_reference(tmp_path):
    """taming-transformers' own Encoder/Decoder (PyPI taming-transformers-rom1504, installable with --no-deps; the
    test is skipped where it is not installed): same keys as the layout above, and the same outputs after import."""
    taming = pytest.importorskip("taming.modules.diffusionmodules.model")
    torch.manual_seed(0)
    encoder, decoder = taming.Encoder(**DDCONFIG).eval(), taming.Decoder(**DDCONFIG).eval()
    with torch.no_grad():
        for param in [*encoder.parameters(), *decoder.parameters()]:
            param.add_(0.05 * torch.randn_like(param))
    layout = ibq_model_shapes()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    assert {k: list(v.shape) for k, v in state.items()} == {
        k: s for k, s in layout.items() if k.startswith(("encoder.", "decoder."))
    }
    for key in (
        "quant_conv.weight",
        "quant_conv.bias",
        "post_quant_conv.weight",
        "post_quant_conv.bias",
        "quantize.embedding.weight",
    ):
        state[key] = torch.randn(layout[key])
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": {"ddconfig": DDCONFIG, "n_embed": N_EMBED, "embed_dim": EMBED_DIM},
        },
        str(tmp_path / "vqgan.ckpt"),
    )
    import_tokenizer("taming", tmp_path / "vqgan.ckpt", tmp_path / "out")
    ours = VQTokenizer.from_pretrained(tmp_path / "out").eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = torch.randn(2, DDCONFIG["z_channels"], 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(images), encoder(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decoder(latents), decoder(latents), atol=1e-5, rtol=0)
        # VQ (taming's VectorQuantizer2): nearest code in L2
        z = ours.quant_conv(ours.encoder(images)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        expected = torch.cdist(z, state["quantize.embedding.weight"]).argmin(-1).reshape(2, 8, 8)
        assert torch.equal(ours.encode(images), expected)


def test_janus_full_model_directory(tmp_path):
    """A whole JanusForConditionalGeneration directory: only `model.vqmodel.*` is imported, the rest is listed."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    vq = {
        "embed_dim": 8,
        "num_embeddings": 64,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 2],
        "num_res_blocks": 1,
        "num_patches": 4,
        "projection_dim": 16,
        "image_token_embed_dim": 16,
    }
    text = {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 128,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 8,
        "projection_dim": 16,
    }
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq))
    model.save_pretrained(tmp_path / "janus")
    summary = import_tokenizer("janus-hf", tmp_path / "janus", tmp_path / "out")
    ours = VQTokenizer.from_pretrained(tmp_path / "out").eval()
    ref = model.model.vqmodel.eval()
    size = 2 * ref.config.num_patches  # JanusConfig sets num_patches from the vision config; 2 levels: x2
    images = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        tokens = ref.encode(images).image_tokens.reshape(2, -1)
        assert torch.equal(ours.encode(images).reshape(2, -1), tokens)
        torch.testing.assert_close(
            ours.decode_indices(ours.encode(images)), ref.decode(tokens), atol=1e-5, rtol=0
        )
    (rest,) = summary["not_imported"].values()
    assert rest and not any(k.startswith("model.vqmodel.") for k in rest)
    assert any(k.startswith("model.language_model.") for k in rest)
