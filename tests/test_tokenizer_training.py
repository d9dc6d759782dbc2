"""Tokenizer training: the discriminator step (single process and 2-rank gloo), EMA, and a stage-0 run that must
improve reconstruction over the untrained model while keeping most of a small codebook in use."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageDraw, ImageFont

from modeling.tokenizer import PatchDiscriminator, TokenizerConfig, VQLossConfig, VQTokenizer
from modeling.tokenizer.metrics import codebook_usage, psnr
from training.gan_step import DiscriminatorStep
from training.objectives import VQLoss


def glyph_images(n: int, seed: int) -> torch.Tensor:
    """[n, 3, 24, 48] in [-1, 1]: three upper-case letters in 16-px cells on a random colour, noise sigma 4."""
    rng = np.random.default_rng(seed)
    fonts = [ImageFont.load_default(size=s) for s in (18, 20, 22)]
    images = []
    for _ in range(n):
        img = Image.new("RGB", (48, 24), tuple(int(v) for v in rng.integers(30, 200, 3)))
        draw = ImageDraw.Draw(img)
        for cell in range(3):
            xy = (16 * cell + 8 + int(rng.integers(-2, 3)), 12 + int(rng.integers(-2, 3)))
            letter = "ABCDEFGHKM"[rng.integers(10)]
            draw.text(xy, letter, fill=(245, 245, 245), font=fonts[rng.integers(3)], anchor="mm")
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 4.0, (24, 48, 3))
        images.append(torch.from_numpy(np.clip(pixels, 0, 255) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(images).float()


def _tiny_loss_config(**kw) -> VQLossConfig:
    return VQLossConfig(disc_ndf=8, disc_layers=2, **kw)


def _disc_step_setup(lecam_weight: float):
    torch.manual_seed(0)
    cfg = _tiny_loss_config(lecam_weight=lecam_weight)
    disc = PatchDiscriminator(cfg)
    loss = VQLoss(cfg)
    return disc, loss, DiscriminatorStep(disc, loss, torch.optim.SGD(disc.parameters(), lr=0.1))


def test_discriminator_step_updates_only_after_start_step():
    torch.manual_seed(0)
    cfg = _tiny_loss_config(gan_start_step=5)
    disc, loss = PatchDiscriminator(cfg), VQLoss(cfg)
    step = DiscriminatorStep(disc, loss, torch.optim.SGD(disc.parameters(), lr=0.1))
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    before = [p.detach().clone() for p in disc.parameters()]
    logs = step.step(real, fake, step=4)
    assert logs["disc/disc"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    logs = step.step(real, fake, step=5)
    assert logs["disc/hinge"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    # the LeCAM EMAs moved towards this batch's mean logits
    assert loss.lecam.ema_real.item() != 0.0


def _rank_worker(
    rank: int, world: int, port: int, images: torch.Tensor, fakes: torch.Tensor, out: dict
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        disc, _, step = _disc_step_setup(lecam_weight=0.0)
        half = images.shape[0] // world
        step.step(images[rank * half : (rank + 1) * half], fakes[rank * half : (rank + 1) * half], step=0)
        out[rank] = [p.detach().clone() for p in disc.parameters()]
    finally:
        dist.destroy_process_group()


def test_discriminator_step_all_reduces_gradients_across_two_ranks():
    """Two gloo ranks, each with half the batch, end with the weights of one process on the full batch
    (GroupNorm is per-sample and the hinge is a mean, so the averaged gradient is the full-batch gradient)."""
    torch.manual_seed(1)
    images, fakes = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    disc, _, step = _disc_step_setup(lecam_weight=0.0)
    step.step(images, fakes, step=0)
    reference = [p.detach() for p in disc.parameters()]

    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(2, port, images, fakes, out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    for p0, p1, ref in zip(ranks[0], ranks[1], reference):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)
        torch.testing.assert_close(p0, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_stage0_training_improves_reconstruction_and_keeps_codebook_in_use():
    """Tiny IBQ tokenizer (ds 8, K 64) on synthetic glyph grids with the full objective (L1, quant, entropy, GAN
    from step 150 with LeCAM): held-out PSNR must rise clearly above the untrained model's, and more than half of
    the codebook must be used on the held-out images."""
    torch.manual_seed(0)
    codebook_size, steps = 64, 250
    cfg = TokenizerConfig(
        base_channels=8, codebook_size=codebook_size, loss=VQLossConfig(disc_ndf=16, gan_start_step=150)
    )
    tokenizer = VQTokenizer(cfg)
    train, heldout = glyph_images(1024, seed=0), glyph_images(128, seed=1)

    def evaluate() -> tuple[float, dict]:
        tokenizer.eval()
        with torch.no_grad():
            out = tokenizer(heldout)
        tokenizer.train()
        return psnr(out.reconstruction, heldout).item(), codebook_usage(out.indices, codebook_size)

    psnr_before, _ = evaluate()
    loss = VQLoss(cfg)
    disc = PatchDiscriminator(cfg.loss)
    disc_step = DiscriminatorStep(disc, loss, torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9)))
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=2e-3, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        # IBQ's order, as the trainer runs it: the discriminator's update, then the tokenizer's.
        images = train[torch.randint(0, len(train), (16,), generator=generator)]
        output = tokenizer(images)
        logs = {k: v.item() for k, v in disc_step.step(images, output.reconstruction, step).items()}
        optimizer.zero_grad(set_to_none=True)
        total, terms = loss.generator_loss(images, output, disc, step)
        total.backward()
        optimizer.step()
        logs.update({f"gen/{k}": v.item() for k, v in terms.items()})
        assert all(np.isfinite(v) for v in logs.values()), logs
    assert logs["disc/hinge"] > 0 and logs["gen/gan"] > 0  # the GAN terms were active at the end

    psnr_after, usage = evaluate()
    assert psnr_after > psnr_before + 1.0, (psnr_before, psnr_after)
    assert usage["usage"] > 0.5, usage
