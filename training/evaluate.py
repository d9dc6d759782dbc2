"""Evaluation on held-out data: caption loss and token accuracy, reconstruction PSNR/SSIM, codebook usage.

`evaluate_model` is pure (a model and batches in, numbers out) and is used both by the train loop (periodic eval,
every rank on its own share of the held-out stream; under ZeRO-3 every rank must run the same number of forward
passes) and by the demo's report. Reconstruction grids are written as PNG (and to TensorBoard during training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling.tokenizer.metrics import codebook_usage, psnr, ssim
from training.objectives import LossModules
from training.stages import STAGES, model_inputs


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Rows of image batches ([B, 3, H, W] in [-1, 1], same B and size) -> one PNG, one row per entry."""
    arrays = [to_uint8(r) for r in rows]
    count, height, width = arrays[0].shape[:3]
    grid = np.full((len(arrays) * (height + pad) + pad, count * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for r, batch in enumerate(arrays):
        for c, image in enumerate(batch):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + height, left : left + width] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


@torch.no_grad()
def evaluate_model(model, batches, kind: str) -> dict:
    """Metrics of `model` (an ETTModel, possibly ZeRO-3 partitioned) over `batches` (packed batch dicts) for stage
    `kind`: the stage's eval objective (its caption or next-code loss, no L_vq) where it has one, and the
    tokenizer's reconstructions wherever the model has a tokenizer.

    Returns sums and counts so that callers can reduce over ranks: caption_loss_sum / caption_tokens,
    caption_correct, psnr_sum / ssim_sum / images, and the histogram of codes for codebook usage."""
    was_training = model.training
    model.eval()
    totals = {
        "caption_loss_sum": 0.0,
        "caption_tokens": 0.0,
        "caption_correct": 0.0,
        "psnr_sum": 0.0,
        "ssim_sum": 0.0,
        "images": 0.0,
    }
    code_counts = None
    first_pair = None
    has_tokenizer = hasattr(model, "tokenizer")
    spec = STAGES[kind]
    for batch in batches:
        if spec.eval_objective is not None:
            outputs = model(**{k: batch[k] for k in spec.model_keys if k in batch})
            out = spec.eval_objective(outputs, batch, LossModules(), 0)
            count = float(out.token_count)
            totals["caption_loss_sum"] += float(out.loss) * count
            totals["caption_tokens"] += count
            totals["caption_correct"] += float(out.token_correct)
        images = batch.get("images")
        if has_tokenizer and images is not None and images.numel():
            quantized, indices, _, _ = model.tokenizer.quantize_images(images, with_losses=False)
            recon = model.tokenizer.decode(quantized).clamp(-1, 1)
            n = images.shape[0]
            totals["psnr_sum"] += float(psnr(recon.float(), images.float())) * n
            totals["ssim_sum"] += float(ssim(recon.float(), images.float())) * n
            totals["images"] += n
            counts = torch.bincount(
                indices.flatten().cpu(), minlength=model.tokenizer.config.codebook_size
            ).double()
            code_counts = counts if code_counts is None else code_counts + counts
            if first_pair is None:
                first_pair = (images[:8].float().cpu(), recon[:8].float().cpu())
    model.train(was_training)
    return {"totals": totals, "code_counts": code_counts, "sample": first_pair}


def summarize(result: dict, world_size: int = 1) -> dict[str, float]:
    """Reduce evaluate_model's sums over ranks and turn them into metrics."""
    keys = sorted(result["totals"])
    vector = torch.tensor([result["totals"][k] for k in keys], dtype=torch.float64)
    counts = result["code_counts"]
    if world_size > 1:
        from training.engine import all_reduce_host

        all_reduce_host(vector)
        if counts is not None:
            counts = all_reduce_host(counts.cpu())
    totals = dict(zip(keys, vector.tolist()))
    metrics: dict[str, float] = {}
    if totals["caption_tokens"]:
        metrics["eval/caption_loss"] = totals["caption_loss_sum"] / totals["caption_tokens"]
        metrics["eval/token_accuracy"] = totals["caption_correct"] / totals["caption_tokens"]
    if totals["images"]:
        metrics["eval/psnr"] = totals["psnr_sum"] / totals["images"]
        metrics["eval/ssim"] = totals["ssim_sum"] / totals["images"]
    if counts is not None:
        usage = codebook_usage_from_counts(counts)
        metrics["eval/codebook_usage"] = usage["usage"]
        metrics["eval/codebook_perplexity"] = usage["perplexity"]
    return metrics


def codebook_usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """A code histogram -> fraction of codes used and the perplexity of the code distribution."""
    indices = torch.repeat_interleave(torch.arange(counts.numel()), counts.long())
    return codebook_usage(indices, counts.numel())


_EVAL_LOADERS: dict = {}


def evaluate_during_training(
    model, cfg, step: int, run_log, rank: int, world_size: int, device=None, dtype=None
) -> dict[str, float]:
    """Periodic evaluation inside the train loop: cfg.train.eval_batches batches of the held-out set per rank
    (moved to `device`, images cast to `dtype`: the engine's), reduced over ranks, logged, plus a reconstruction
    grid PNG (input row over reconstruction row)."""
    from training.data import build_eval_loader

    key = (cfg.data.eval, rank, world_size)
    if key not in _EVAL_LOADERS:
        _EVAL_LOADERS[key] = build_eval_loader(cfg, rank, world_size)
    loader = _EVAL_LOADERS[key]
    kind = cfg.stage.kind
    keys = (*STAGES[kind].batch_keys, "images")
    batches = [model_inputs(next(loader), keys, device, dtype) for _ in range(cfg.train.eval_batches)]
    result = evaluate_model(model, batches, kind)
    metrics = summarize(result, world_size)
    run_log.metrics(step, metrics, postfix=False)
    if rank == 0 and result["sample"] is not None:
        images, recon = result["sample"]
        path = save_image_grid(
            [images, recon], Path(cfg.train.output_dir) / "eval" / f"reconstruction_step{step:06d}.png"
        )
        run_log.image(
            "eval/reconstruction", step, torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1)
        )
    return metrics
