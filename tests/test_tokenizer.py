"""VQ tokenizer: quantizer gradients against naive full-materialisation references, shapes and bad input,
save/load read back with safetensors' numpy API, LPIPS against a functional VGG16, metrics against scipy/numpy,
and the GAN losses against their formulas."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from modeling.tokenizer import LPIPS, PatchDiscriminator, TokenizerConfig, VQLossConfig, VQTokenizer
from modeling.tokenizer.metrics import codebook_usage, psnr, ssim
from modeling.tokenizer.quantizers import IBQuantizer, VectorQuantizer
from training.objectives import VQLoss


def tiny_config(**kw) -> TokenizerConfig:
    base = dict(base_channels=8, channel_mult=(1, 2, 2), z_channels=8, code_dim=8, codebook_size=24)
    base.update(kw)
    return TokenizerConfig(**base)


def _naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    per_row = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    return per_row + (avg * avg.clamp_min(1e-30).log()).sum()


def test_ibq_gradient_reaches_every_code_and_matches_naive_reference(seed_everything):
    cfg = tiny_config()
    quantizer = IBQuantizer(cfg)
    z = torch.randn(2, cfg.code_dim, 3, 4, requires_grad=True)
    weight = torch.randn(2, cfg.code_dim, 3, 4)
    out = quantizer(z)
    codebook = quantizer.embedding.weight
    # forward value is exactly the selected code
    assert torch.equal(out.quantized.permute(0, 2, 3, 1), codebook.detach()[out.indices])
    loss = (out.quantized * weight).sum() + out.losses["quant"] + 0.05 * out.losses["entropy"]
    grad_z, grad_c = torch.autograd.grad(loss, [z, codebook])
    assert (grad_c.abs().sum(1) > 0).all(), "IBQ must give gradient to every codebook row"

    # naive reference: full N x K logits, Ind = H - sg(S) + S, the spec's double quantisation loss
    zr, cr = z.detach().clone().requires_grad_(), codebook.detach().clone().requires_grad_()
    flat = zr.permute(0, 2, 3, 1).reshape(-1, cfg.code_dim)
    logits = flat @ cr.T
    soft = logits.softmax(-1)
    hard = F.one_hot(logits.argmax(-1), cfg.codebook_size).float()
    zq = (hard - soft.detach() + soft) @ cr
    zq2 = hard @ cr
    quant = F.mse_loss(zq, flat) + F.mse_loss(flat, zq2.detach()) + 0.25 * F.mse_loss(zq2, flat.detach())
    entropy = _naive_entropy(logits / cfg.entropy_temperature)
    ref = (zq.reshape(2, 3, 4, -1).permute(0, 3, 1, 2) * weight).sum() + quant + 0.05 * entropy
    ref_z, ref_c = torch.autograd.grad(ref, [zr, cr])
    assert torch.equal(out.indices.reshape(-1), logits.argmax(-1))
    torch.testing.assert_close(out.losses["entropy"], entropy.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_z, ref_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_c, ref_c, rtol=1e-4, atol=1e-5)


def test_ibq_tokenizer_gradient_reaches_encoder_and_all_codes(seed_everything):
    tok = VQTokenizer(tiny_config())
    quantized, _, _, _ = tok.quantize_images(torch.rand(2, 3, 16, 16) * 2 - 1)
    (quantized * torch.randn_like(quantized)).sum().backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert (tok.codebook.grad.abs().sum(1) > 0).all()


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_vq_selects_nearest_code_and_updates_only_selected_rows(seed_everything, l2_normalize):
    cfg = tiny_config(quantizer="vq", vq_l2_normalize=l2_normalize, codebook_size=64)
    quantizer = VectorQuantizer(cfg)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    z = torch.randn(2, cfg.code_dim, 2, 3, requires_grad=True)
    out = quantizer(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim)
    codes = quantizer.embedding.weight.detach()
    if l2_normalize:
        flat, codes = F.normalize(flat, dim=-1), F.normalize(codes, dim=-1)
    expected = torch.cdist(flat, codes).argmin(-1)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.equal(out.quantized.permute(0, 2, 3, 1).reshape(-1, cfg.code_dim), codes[expected])

    (grad_c,) = torch.autograd.grad(out.losses["quant"], [quantizer.embedding.weight], retain_graph=True)
    used = torch.zeros(cfg.codebook_size, dtype=torch.bool)
    used[expected] = True
    assert (grad_c[used].abs().sum(1) > 0).all() and (grad_c[~used] == 0).all()
    # straight-through: the gradient of the quantised output reaches z unchanged (no normalisation)
    if not l2_normalize:
        upstream = torch.randn_like(out.quantized)
        (grad_z,) = torch.autograd.grad(out.quantized, [z], upstream)
        torch.testing.assert_close(grad_z, upstream)
    # entropy over -||z - c||^2 / 2 logits
    ref = _naive_entropy(-0.5 * torch.cdist(flat, codes).pow(2) / cfg.entropy_temperature)
    torch.testing.assert_close(out.losses["entropy"], ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("quantizer_class", [IBQuantizer, VectorQuantizer])
def test_quantizer_without_losses_gives_the_same_codes_and_gradients(quantizer_class, seed_everything):
    """with_losses=False (frozen tokenizers, encode) skips L_quant and L_entropy but leaves the codes, the indices
    and the straight-through gradients to z and the codebook bitwise as the full forward gives them."""
    cfg = tiny_config(loss=VQLossConfig(entropy_weight=0.05))
    quantizer = quantizer_class(cfg)
    z = torch.randn(2, cfg.code_dim, 3, 4, requires_grad=True)
    weight = torch.randn(2, cfg.code_dim, 3, 4)
    grads = []
    for with_losses in (True, False):
        out = quantizer(z, with_losses=with_losses)
        assert set(out.losses) == ({"quant", "entropy"} if with_losses else set())
        loss = (out.quantized * weight).sum()
        grads.append((out, torch.autograd.grad(loss, [z, quantizer.embedding.weight], allow_unused=True)))
    (full, full_grads), (lean, lean_grads) = grads
    assert torch.equal(full.quantized, lean.quantized) and torch.equal(full.indices, lean.indices)
    for a, b in zip(full_grads, lean_grads):  # VQ: the codes get no gradient from z_q (straight through to z)
        assert (a is None and b is None) or torch.equal(a, b)


def test_tokenizer_shapes_embed_and_usage_count(seed_everything):
    cfg = tiny_config()
    tok = VQTokenizer(cfg)
    images = torch.rand(2, 3, 8, 16) * 2 - 1
    out = tok(images)
    assert out.reconstruction.shape == images.shape
    assert out.indices.shape == (2, 2, 4) and out.indices.dtype == torch.long
    assert out.quantized.shape == (2, cfg.code_dim, 2, 4)
    assert set(out.quant_losses) == {"quant", "entropy"} and set(out.stats) == {"perplexity", "usage"}
    assert torch.equal(tok.embed(out.indices), tok.codebook.detach()[out.indices])
    torch.testing.assert_close(tok.decode_indices(out.indices), out.reconstruction)
    assert torch.equal(tok.encode(images), out.indices)
    expected = codebook_usage(out.indices, cfg.codebook_size)
    assert out.stats["usage"].item() == pytest.approx(len(out.indices.unique()) / cfg.codebook_size)
    assert out.stats["perplexity"].item() == pytest.approx(expected["perplexity"])


def test_bad_input_names_shape_and_expectation():
    tok = VQTokenizer(tiny_config())
    with pytest.raises(ValueError, match=r"\[2, 1, 16, 16\].*expected \[B, 3, H, W\]"):
        tok(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[2, 3, 16, 18\].*downsample factor 4"):
        tok(torch.zeros(2, 3, 16, 18))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 24\)"):
        tok.decode_indices(torch.full((1, 2, 2), 24, dtype=torch.long))
    with pytest.raises(ValueError, match="norm_groups"):
        VQTokenizer(tiny_config(base_channels=6))


def test_save_and_load_round_trip(tmp_path, seed_everything):
    cfg = tiny_config(quantizer="vq", attn_resolutions=(8,))
    tok = VQTokenizer(cfg)
    tok.save_pretrained(tmp_path)
    on_disk = load_numpy(str(tmp_path / "model.safetensors"))
    assert on_disk.keys() == tok.state_dict().keys()
    for name, value in tok.state_dict().items():
        np.testing.assert_array_equal(on_disk[name], value.numpy())
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["attn_resolutions"] == [8]
    loaded = VQTokenizer.from_pretrained(tmp_path)
    assert loaded.config == cfg
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.reconstruct(images), tok.reconstruct(images))
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        VQTokenizer.from_pretrained(tmp_path / "missing")


def _random_lpips_file(path, layout: str) -> dict:
    """Random VGG16 + LPIPS head weights in torchvision (`features.i`) or taming (`net.sliceN.i`) layout."""
    gen = torch.Generator().manual_seed(0)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
    widths += [(256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    slice_of = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    raw = {}
    for idx, (cin, cout) in zip(convs, widths):
        prefix = f"features.{idx}" if layout == "torchvision" else f"net.slice{slice_of[idx]}.{idx}"
        raw[f"{prefix}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
        raw[f"{prefix}.bias"] = torch.randn(cout, generator=gen) * 0.01
    for i, c in enumerate([64, 128, 256, 512, 512]):
        raw[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=gen)
    save_file(raw, str(path))
    return raw


def _functional_lpips(raw: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written directly from the definition with F.conv2d on the raw tensors."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    blocks = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]

    def features(t):
        t, out = (t - shift) / scale, []
        for b, block in enumerate(blocks):
            if b:
                t = F.max_pool2d(t, 2)
            for idx in block:
                t = F.relu(F.conv2d(t, raw[f"features.{idx}.weight"], raw[f"features.{idx}.bias"], padding=1))
            out.append(t)
        return out

    total = 0
    for i, (fx, fy) in enumerate(zip(features(x), features(y))):
        nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((nx - ny) ** 2 * raw[f"lin{i}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_functional_reference_and_both_layouts(tmp_path, seed_everything):
    raw = _random_lpips_file(tmp_path / "tv.safetensors", "torchvision")
    _random_lpips_file(tmp_path / "taming.safetensors", "taming")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    lpips = LPIPS.from_file(tmp_path / "tv.safetensors")
    torch.testing.assert_close(lpips(x, y), _functional_lpips(raw, x, y), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(LPIPS.from_file(tmp_path / "taming.safetensors")(x, y), lpips(x, y))
    assert lpips(x, x).abs().max() < 1e-6
    y.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in lpips.parameters())


def test_perceptual_weight_file_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"perceptual_weights_path=.*nope\.safetensors"):
        VQLoss(VQLossConfig(perceptual_weight=1.0, perceptual_weights_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="perceptual_weights_path"):
        VQLoss(VQLossConfig(perceptual_weight=1.0))
    assert (
        VQLoss(VQLossConfig(perceptual_weight=0.0, perceptual_weights_path=str(missing))).perceptual is None
    )
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"lacks LPIPS weights.*features"):
        LPIPS.from_file(tmp_path / "partial.safetensors")


def test_generator_loss_is_weighted_sum_and_zero_weights_skip_terms(seed_everything):
    cfg = tiny_config()
    cfg.loss = VQLossConfig(
        l1_weight=1.0, l2_weight=0.5, gan_weight=0.1, entropy_weight=0.05, disc_ndf=8, disc_layers=2
    )
    tok, disc = VQTokenizer(cfg), PatchDiscriminator(cfg.loss)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = tok(images)
    total, logs = VQLoss(cfg).generator_loss(images, out, disc, step=0)
    rec = out.reconstruction
    gan = -F.logsigmoid(disc(rec).flatten(1).mean(1)).mean()
    expected = (
        (images - rec).abs().mean()
        + 0.5 * (images - rec).pow(2).mean()
        + out.quant_losses["quant"]
        + 0.1 * gan
        + 0.05 * out.quant_losses["entropy"]
    )
    torch.testing.assert_close(total, expected)
    total.backward()
    assert all(p.grad is None for p in disc.parameters()), (
        "the generator loss must not train the discriminator"
    )
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0

    cfg.loss = VQLossConfig(gan_weight=0.0, entropy_weight=0.0, l1_weight=1.0)
    out = VQTokenizer(cfg)(images)
    assert out.quant_losses["entropy"].item() == 0.0
    total, logs = VQLoss(cfg).generator_loss(images, out, None, step=0)
    assert logs["gan"].item() == 0.0 and logs["entropy"].item() == 0.0 and logs["perceptual"].item() == 0.0
    torch.testing.assert_close(total, (images - out.reconstruction).abs().mean() + out.quant_losses["quant"])


def test_discriminator_loss_hinge_and_lecam(seed_everything):
    cfg = VQLossConfig(disc_ndf=8, disc_layers=2, lecam_weight=0.5, lecam_decay=0.9)
    disc, loss = PatchDiscriminator(cfg), VQLoss(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    total, logs = loss.discriminator_loss(real, fake, disc, step=0)
    lr, lf = disc(real), disc(fake)
    ema_real, ema_fake = 0.1 * lr.mean(), 0.1 * lf.mean()
    hinge = 0.5 * (torch.clamp(1 - lr, min=0).mean() + torch.clamp(1 + lf, min=0).mean())
    lecam = (torch.clamp(lr - ema_fake, min=0) ** 2).mean() + (torch.clamp(ema_real - lf, min=0) ** 2).mean()
    torch.testing.assert_close(total, hinge + 0.5 * lecam)
    torch.testing.assert_close(loss.lecam.ema_real, ema_real.detach())
    assert lr.shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"H, W >= 12"):
        disc(torch.zeros(1, 3, 8, 8))


def test_psnr_and_ssim_match_independent_references(seed_everything):
    x = torch.rand(2, 3, 24, 20) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref_psnr = np.mean([10 * np.log10(4.0 / np.mean((a - b) ** 2)) for a, b in zip(xn, yn)])
    assert psnr(x, y).item() == pytest.approx(ref_psnr, rel=1e-5)

    from scipy.ndimage import gaussian_filter  # here, not at the top: a bare GPU machine has no scipy

    # Wang et al. SSIM with scipy's Gaussian filter (sigma 1.5, radius 5 -> 11x11), 'valid' region only
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    values = []
    for a2, b2 in zip(xn.reshape(-1, 24, 20), yn.reshape(-1, 24, 20)):

        def g(t):
            return gaussian_filter(t, sigma=1.5, truncate=3.5)[5:-5, 5:-5]

        mx, my = g(a2), g(b2)
        vx, vy, cxy = g(a2 * a2) - mx**2, g(b2 * b2) - my**2, g(a2 * b2) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    assert ssim(x, y).item() == pytest.approx(float(np.mean(values)), rel=1e-5)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)


def test_config_dict_round_trip_rejects_unknown_keys():
    cfg = tiny_config(channel_mult=(1, 2, 2, 4), loss=VQLossConfig(gan_start_step=7))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TokenizerConfig.from_dict(data) == cfg
    assert cfg.downsample_factor == 8
    data["loss"]["gan_wieght"] = 1.0
    with pytest.raises(ValueError, match=r"TokenizerConfig.loss: unknown keys \['gan_wieght'\]"):
        TokenizerConfig.from_dict(data)
