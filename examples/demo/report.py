"""The demo's report: every arm of examples/demo/recipe.yaml evaluated on the held-out glyph grids.

    python -m examples.demo.report --run-dir runs/demo [--out runs/demo/report] [--max-images 300]

For each seed and arm (ETT, ETT with alpha = 0, frozen codebook embeddings, frozen indices, frozen indices on the
control tokenizer) the stage-2 hand-off is loaded and captions the held-out images greedily (KV cache). Scores are
on the letters, the part of the caption that needs reading (token accuracy is dominated by the colour word and
the caption's fixed form, which every arm learns): word exact-match (all 3 letters right), character accuracy
(position-wise over the 3 letters) and colour accuracy, kept per image as well. Word exact-match and character
accuracy come with percentile bootstrap 95% intervals over the held-out images (2,000 resamples, fixed seed). Per
seed, ETT is compared with its best frozen arm (the highest word exact-match of frozen embeddings, frozen indices and
the control), with paired bootstrap intervals of the differences. The vision tokenizer of every hand-off is scored on
reconstruction (PSNR, SSIM) and codebook usage / perplexity, against the stage-0 tokenizer (before ETT; PSNR before
and after per seed for ETT and alpha 0) and the control tokenizer. Stage 3: the chat model answers "What letters are
written in the image?" on the held-out images; the t2i run's loss curve. Prompts are the training layouts
(data_pipeline/layouts.py), as in training/infer.py.

Writes OUT/results.json (per seed and arm: point estimates, "word_exact_match_ci" / "char_accuracy_ci" and the
reconstruction metrics; "ett_minus_best_frozen", "psnr_before_after", "per_image" letter scores, "bootstrap"
settings, "tokenizers", "chat", "t2i"), OUT/report.md (verdict and paper-claim lines computed from the numbers; tables
over seeds, per seed with intervals, ETT minus the best frozen arm, PSNR before/after, stage 3) and PNGs (loss curves,
each arm's captions of held-out images, labelled reconstructions, t2i samples). Numbers are reported as measured.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARMS = {
    "ett": "ETT (alpha 0.25)",
    "ett_alpha0": "ETT alpha 0 (caption only)",
    "frozen_emb": "frozen codebook embeddings",
    "frozen_index": "frozen indices (Emu3-style)",
    "control_frozen_index": "control: frozen indices, tokenizer + extra L_vq steps",
}
SHORT_LABELS = {
    "ett": "ETT α=0.25",
    "ett_alpha0": "ETT α=0",
    "frozen_emb": "frozen emb.",
    "frozen_index": "frozen indices",
    "control_frozen_index": "control frozen idx",
}
FROZEN_BASELINES = ("frozen_emb", "frozen_index")
FROZEN_ARMS = ("frozen_emb", "frozen_index", "control_frozen_index")
STAGE0 = "stage0 (before stage 2)"
CHAT_QUESTION = "What letters are written in the image?"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass
class HeldOut:
    """The held-out captioning split: images [N, 3, H, W] in [-1, 1], the letters and background colour of each."""

    images: torch.Tensor
    letters: list[str]
    colours: list[str]


def load_heldout(dataset_dir: str | Path, image_size: tuple[int, int], max_images: int) -> HeldOut:
    """Read the first `max_images` caption samples ("<colour> <letters>") of a dataset directory."""
    from data_pipeline.processing import decode_image
    from data_pipeline.shards import ShardDataset

    dataset = ShardDataset(dataset_dir)
    images, letters, colours = [], [], []
    for shard, rows in enumerate(dataset.shard_rows):
        for index in range(rows):
            if len(images) == max_images:
                break
            segments = dataset.row(shard, index)["segments"]
            image = next(s["image"] for s in segments if s["image"] is not None)
            caption = next(s["text"] for s in segments if s["text"] is not None)
            colour, word = caption.split()
            images.append(torch.from_numpy(decode_image(image, image_size)))
            letters.append(word)
            colours.append(colour)
    if not images:
        raise ValueError(f"{dataset_dir}: no held-out samples")
    return HeldOut(torch.stack(images).float() / 127.5 - 1.0, letters, colours)


@torch.no_grad()
def generate_after_images(
    model,
    text_tokenizer,
    images: torch.Tensor,
    question: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy text after the caption prompt of each image (data_pipeline.layouts.caption_prompt: the caption
    layout, or with `chat` the chat layout around `question`) -> decoded strings. The batched form of
    training.infer.caption (one image per call), so that hundreds of held-out images take seconds."""
    from data_pipeline.layouts import caption_prompt, image_grid
    from modeling.llm.generation import generate

    grid = image_grid(tuple(images.shape[2:]), model.tokenizer.config.downsample_factor)
    prompt_ids = caption_prompt(text_tokenizer, grid, question, chat=chat)
    prompt = torch.tensor(prompt_ids).repeat(images.shape[0], 1)
    image_embeds, _ = model.image_embeddings(images)
    embeds = model.input_embeddings(prompt, prompt == text_tokenizer.image_placeholder_id, image_embeds)
    tokens = generate(
        model.llm, inputs_embeds=embeds, max_new_tokens=max_new_tokens, eos_token_id=text_tokenizer.eos_id
    )
    texts = []
    for row in tokens.tolist():
        if text_tokenizer.eos_id in row:
            row = row[: row.index(text_tokenizer.eos_id)]
        texts.append(text_tokenizer.decode(row).strip())
    return texts


def caption_images(model, text_tokenizer, images: torch.Tensor, batch_size: int = 100) -> list[str]:
    """Greedy captions (the caption layout: BOS, image span, caption, EOS)."""
    captions = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        captions += generate_after_images(model, text_tokenizer, chunk)
    return captions


def letter_hits(predicted: list[str], letters: list[str]) -> dict[str, np.ndarray]:
    """Per image [N]: word exact-match (0 or 1) and position-wise character accuracy (k/3 for 3 letters)."""
    exact = [p == t for p, t in zip(predicted, letters)]
    chars = [sum(a == b for a, b in zip(p, t)) / len(t) for p, t in zip(predicted, letters)]
    return {"word_exact_match": np.array(exact, dtype=float), "char_accuracy": np.array(chars, dtype=float)}


def score_letters(predicted: list[str], letters: list[str]) -> dict[str, float]:
    """Word exact-match and position-wise character accuracy of predicted letter strings (means over images)."""
    return {key: float(np.mean(hits)) for key, hits in letter_hits(predicted, letters).items()}


def score_captions(captions: list[str], heldout: HeldOut) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Captions "<colour> <letters>" -> (word exact-match, character accuracy (letters) and colour accuracy;
    the per-image letter scores of letter_hits, each [N])."""
    words = [c.split()[-1] if c.split() else "" for c in captions]
    colours = [c.split()[0] if c.split() else "" for c in captions]
    hits = letter_hits(words, heldout.letters)
    scores = {key: float(np.mean(values)) for key, values in hits.items()}
    scores["colour_accuracy"] = float(np.mean([p == t for p, t in zip(colours, heldout.colours)]))
    return scores, hits


def bootstrap_indices(
    num_images: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """[resamples, num_images] image indices drawn with replacement (numpy Generator with a fixed seed): the same
    resamples for every arm, so that differences between arms are paired."""
    return np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))


def percentile_interval(per_image: np.ndarray, indices: np.ndarray) -> list[float]:
    """Percentile bootstrap 95% interval [lo, hi] of the mean of `per_image` [N] over the resamples `indices`
    [R, N]; for a paired difference pass the per-image difference of two arms."""
    lo, hi = np.percentile(per_image[indices].mean(axis=1), [2.5, 97.5])
    return [float(lo), float(hi)]


def best_frozen_arm(arms: dict, seed: int) -> str | None:
    """The arm of FROZEN_ARMS with the highest word exact-match on `seed` (ties: the higher character accuracy,
    then FROZEN_ARMS order); None when no frozen arm ran on that seed."""
    candidates = [arm for arm in FROZEN_ARMS if seed in arms.get(arm, {})]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (arms[a][seed]["word_exact_match"], arms[a][seed]["char_accuracy"]))


def ett_minus_best_frozen(arms: dict, per_image: dict, indices: np.ndarray) -> dict[int, dict]:
    """Per seed: ETT minus its best frozen arm in word exact-match and character accuracy, each with a paired
    bootstrap 95% interval (the same resampled images for both arms). `per_image`: arm -> seed -> letter_hits."""
    comparison = {}
    for seed in sorted(arms["ett"]):
        best = best_frozen_arm(arms, seed)
        if best is None:
            continue
        entry: dict = {"best_frozen": best}
        for metric in ("word_exact_match", "char_accuracy"):
            entry[metric] = arms["ett"][seed][metric] - arms[best][seed][metric]
            difference = per_image["ett"][seed][metric] - per_image[best][seed][metric]
            entry[f"{metric}_ci"] = percentile_interval(difference, indices)
        comparison[seed] = entry
    return comparison


def psnr_before_after(results: dict) -> dict[int, dict]:
    """Per seed: the stage-0 tokenizer's PSNR (before stage 2), the ETT and alpha-0 arms' tokenizers' PSNR (after)
    and their differences to stage 0, all on the held-out images; empty without a stage-0 tokenizer."""
    if STAGE0 not in results["tokenizers"]:
        return {}
    before = results["tokenizers"][STAGE0]["psnr"]
    table = {}
    for seed in sorted(results["arms"]["ett"]):
        row = {"stage0": before}
        for arm in ("ett", "ett_alpha0"):
            if seed in results["arms"].get(arm, {}):
                row[arm] = results["arms"][arm][seed]["psnr"]
                row[f"{arm}_minus_stage0"] = row[arm] - before
        table[seed] = row
    return table


def chat_letters(answers: list[str]) -> list[str]:
    """'The letters are KBF.' -> 'kbf' (empty when the answer has another form)."""
    found = [re.search(r"letters are ([A-Za-z]+)", a) for a in answers]
    return [m.group(1).lower() if m else "" for m in found]


@torch.no_grad()
def reconstruction_metrics(tokenizer, images: torch.Tensor, batch_size: int = 100) -> dict[str, float]:
    """PSNR / SSIM of the tokenizer's reconstructions, codebook usage and perplexity on `images`."""
    from training.evaluate import evaluate_model, summarize

    class TokenizerOnly(torch.nn.Module):
        def __init__(self, tok):
            super().__init__()
            self.tokenizer = tok

    batches = [{"images": images[i : i + batch_size]} for i in range(0, images.shape[0], batch_size)]
    metrics = summarize(evaluate_model(TokenizerOnly(tokenizer), batches, "tokenizer"))
    return {
        "psnr": metrics["eval/psnr"],
        "ssim": metrics["eval/ssim"],
        "usage": metrics["eval/codebook_usage"],
        "perplexity": metrics["eval/codebook_perplexity"],
    }


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor) -> torch.Tensor:
    quantized, _, _, _ = tokenizer.quantize_images(images, with_losses=False)
    return tokenizer.decode(quantized).clamp(-1, 1)


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def find_seeds(run_dir: Path) -> list[int]:
    """Seeds n with a finished s<n>_ett stage."""
    seeds = []
    for path in run_dir.glob("s*_ett"):
        match = re.fullmatch(r"s(\d+)_ett", path.name)
        if match and (path / "final").is_dir():
            seeds.append(int(match.group(1)))
    return sorted(seeds)


# ---- figures ------------------------------------------------------------------------------------------------------
def plot_loss_curves(run_dir: Path, seeds: list[int], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(seeds) + 1
    fig, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.4), squeeze=False)
    ax = axes[0, 0]
    for name, key in (
        ("stage0_tokenizer", "vq/l1"),
        ("tokenizer_control", "vq/l1"),
        ("llm_pretrain", "loss/caption"),
    ):
        steps, values = curve(read_metrics(run_dir / name), key)
        if steps:
            ax.plot(steps, values, label=f"{name} ({key})")
    ax.set_title("pretraining")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    for column, seed in enumerate(seeds, start=1):
        ax = axes[0, column]
        for arm, label in SHORT_LABELS.items():
            steps, values = curve(read_metrics(run_dir / f"s{seed}_{arm}"), "loss/caption")
            if steps:
                ax.plot(steps, values, label=label)
        ax.set_title(f"stage 2 caption loss, seed {seed}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_caption_grid(heldout: HeldOut, captions: dict[str, list[str]], out: Path, count: int = 8) -> Path:
    """The first `count` held-out images in a row, the truth under them, then one row per arm (key of ARMS, its
    SHORT_LABELS name in a left column) with that arm's caption of each image: green when the letters are right.
    The figure's size follows the number of images and arms; captions longer than a cell are cut with "…", empty
    ones shown as "(empty)"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate import to_uint8

    count = min(count, heldout.images.shape[0])
    pixels = to_uint8(heldout.images[:count])
    height, width = pixels.shape[1:3]
    label_in, cell_in, row_in, pad_in, max_chars = 1.7, 1.45, 0.26, 0.08, 17
    image_in = (cell_in - 2 * pad_in) * height / width
    rows = [("truth", [f"{c} {w}" for c, w in zip(heldout.colours, heldout.letters)], None)]
    rows += [(SHORT_LABELS[arm], texts, arm) for arm, texts in captions.items()]
    text_in = row_in * len(rows) + pad_in
    fig_width, fig_height = label_in + cell_in * count, text_in + image_in + 2 * pad_in
    fig = plt.figure(figsize=(fig_width, fig_height))
    for i in range(count):
        left = label_in + i * cell_in + pad_in
        ax = fig.add_axes(
            [
                left / fig_width,
                text_in / fig_height,
                (cell_in - 2 * pad_in) / fig_width,
                image_in / fig_height,
            ]
        )
        ax.imshow(pixels[i])
        ax.set_xticks([])
        ax.set_yticks([])
    for row, (label, texts, arm) in enumerate(rows):
        y = (text_in - row_in * (row + 0.5)) / fig_height
        fig.text(pad_in / fig_width, y, label, fontsize=8, weight="bold", va="center")
        for i in range(count):
            text = texts[i] if len(texts[i]) <= max_chars else texts[i][: max_chars - 1] + "…"
            text = text or "(empty)"
            right = texts[i].split()[-1:] == [heldout.letters[i]]
            fig.text(
                (label_in + (i + 0.5) * cell_in) / fig_width,
                y,
                text,
                fontsize=8,
                family="monospace",
                ha="center",
                va="center",
                color="black" if arm is None else "green" if right else "red",
            )
    path = out / "captions.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reconstructions(rows: dict[str, torch.Tensor], out: Path) -> Path:
    """One row per entry of `rows` (label -> images [B, 3, H, W] in [-1, 1], the same B for all), its label in a
    left column: the input images, then each tokenizer's reconstructions of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate import to_uint8

    arrays = [to_uint8(images) for images in rows.values()]
    count, height, width = arrays[0].shape[:3]
    label_in, cell_in, pad_in = 1.6, 1.0, 0.04
    row_in = cell_in * height / width + 2 * pad_in
    fig_width, fig_height = label_in + cell_in * count, row_in * len(arrays)
    fig = plt.figure(figsize=(fig_width, fig_height))
    for r, (label, batch) in enumerate(zip(rows, arrays)):
        bottom = fig_height - row_in * (r + 1) + pad_in
        fig.text(
            0.08 / fig_width, (bottom + row_in / 2 - pad_in) / fig_height, label, fontsize=8, va="center"
        )
        for i, image in enumerate(batch):
            ax = fig.add_axes(
                [
                    (label_in + i * cell_in + pad_in) / fig_width,
                    bottom / fig_height,
                    (cell_in - 2 * pad_in) / fig_width,
                    (row_in - 2 * pad_in) / fig_height,
                ]
            )
            ax.imshow(image)
            ax.set_axis_off()
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- report -------------------------------------------------------------------------------------------------------
def summarize_arm(per_seed: dict[int, dict], key: str) -> str:
    values = [m[key] for m in per_seed.values() if key in m]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def verdict_lines(results: dict) -> list[str]:
    """The paper's claims (ETT reads images better than frozen-tokenizer baselines, and than a tokenizer given the
    same extra reconstruction training, while its reconstruction stays close to the stage-0 tokenizer's), checked
    against the measured numbers, seed by seed."""
    seeds = sorted(results["arms"]["ett"])
    lines = []
    for metric in ("word_exact_match", "char_accuracy"):
        wins = [
            s
            for s in seeds
            if all(
                results["arms"]["ett"][s][metric] > results["arms"][b][s][metric]
                for b in FROZEN_BASELINES
                if s in results["arms"][b]
            )
        ]
        lines.append(
            f"- ETT beats both frozen baselines on {metric.replace('_', ' ')} on {len(wins)} of {len(seeds)} seeds "
            f"({', '.join(map(str, wins)) or 'none'})."
        )
    control = results["arms"].get("control_frozen_index", {})
    beats_control = [
        s
        for s in seeds
        if s in control and results["arms"]["ett"][s]["char_accuracy"] > control[s]["char_accuracy"]
    ]
    lines.append(
        f"- ETT beats the control (frozen indices on a tokenizer with the same extra reconstruction training) on "
        f"character accuracy on {len(beats_control)} of {len(seeds)} seeds."
    )
    if STAGE0 not in results["tokenizers"]:
        return lines
    before = results["tokenizers"][STAGE0]["psnr"]
    for arm in ("ett", "ett_alpha0"):
        deltas = [
            results["arms"][arm][s]["psnr"] - before for s in seeds if s in results["arms"].get(arm, {})
        ]
        if deltas:
            within = sum(abs(d) <= 1.0 for d in deltas)
            lines.append(
                f"- {ARMS[arm]}: reconstruction PSNR changes by {', '.join(f'{d:+.2f}' for d in deltas)} dB against "
                f"the stage-0 tokenizer ({before:.2f} dB); within 1 dB on {within} of {len(deltas)} seeds."
            )
    return lines


def with_interval(value: float, interval: list[float], sign: str = "") -> str:
    """0.46, [0.403, 0.517] -> '0.460 [0.403, 0.517]' (sign '+': signed numbers, for differences)."""
    lo, hi = interval
    return f"{value:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def seed_list(seeds: list[int]) -> str:
    """[1, 3] -> '1, 3'; [] -> 'none'."""
    return ", ".join(map(str, seeds)) or "none"


def usage_list(usage: dict[int, float], stage0_usage: float) -> str:
    """{1: 0.8} and 0.9 -> 'seed 1: 0.800 (0.89 of stage 0)'."""
    return ", ".join(f"seed {s}: {u:.3f} ({u / stage0_usage:.2f} of stage 0)" for s, u in usage.items())


def paper_claim_lines(results: dict) -> list[str]:
    """The paper's claims 2, 3, 4 and 6, each judged from the measured numbers, seed by seed: one line per claim."""
    arms = results["arms"]
    seeds = sorted(arms["ett"])
    alpha0 = arms.get("ett_alpha0", {})
    comparison = results["ett_minus_best_frozen"]
    before_after = results["psnr_before_after"]
    lines = []

    above = [s for s in seeds if s in comparison and comparison[s]["word_exact_match_ci"][0] > 0]
    lines.append(
        '- Claim 2, "ETT (joint tuning, alpha = 0.25) beats both frozen baselines on understanding": reproduced on '
        f"{len(above)} of {len(seeds)} seeds ({seed_list(above)}), counting a seed when the paired 95% interval of "
        "ETT minus the best frozen arm in word exact-match lies above 0."
    )

    better = [
        s for s in seeds if s in alpha0 and alpha0[s]["word_exact_match"] > arms["ett"][s]["word_exact_match"]
    ]
    best_part = (
        f"alpha-0 word exact-match above ETT's on {len(better)} of {len(seeds)} seeds ({seed_list(better)})"
    )
    best_holds = len(better) == len(seeds)
    alpha0_drops = [
        before_after[s]["ett_alpha0_minus_stage0"] for s in seeds if "ett_alpha0" in before_after.get(s, {})
    ]
    ett_changes = [before_after[s]["ett_minus_stage0"] for s in seeds if "ett" in before_after.get(s, {})]
    if not before_after or len(alpha0_drops) < len(seeds):
        lines.append(
            '- Claim 3, "Caption-only tuning (alpha = 0, no L_vq) destroys reconstruction while giving the best '
            'understanding": reconstruction destroyed: not judged (no stage-0 tokenizer or alpha-0 arm on every '
            f"seed); best understanding: {'holds' if best_holds else 'does not hold'} ({best_part})."
        )
    else:
        destroyed = all(d < -1.0 for d in alpha0_drops)
        parts = {
            (True, True): "both parts hold",
            (True, False): "only the reconstruction part holds",
            (False, True): "only the understanding part holds",
            (False, False): "neither part holds",
        }
        lines.append(
            '- Claim 3, "Caption-only tuning (alpha = 0, no L_vq) destroys reconstruction while giving the best '
            f'understanding": {parts[destroyed, best_holds]}. Reconstruction destroyed (alpha-0 PSNR more than 1 dB '
            f"below the stage-0 tokenizer's on every seed): {'holds' if destroyed else 'does not hold'} (alpha 0 minus "
            f"stage 0: {', '.join(f'{d:+.2f}' for d in alpha0_drops)} dB). Best understanding: "
            f"{'holds' if best_holds else 'does not hold'} ({best_part})."
        )

    gains = []
    for s in seeds:
        best = comparison.get(s, {}).get("best_frozen")
        if best is None or s not in alpha0:
            continue
        frozen = arms[best][s]["word_exact_match"]
        caption_only_gain = alpha0[s]["word_exact_match"] - frozen
        ett_gain = arms["ett"][s]["word_exact_match"] - frozen
        if caption_only_gain > 0 and ett_gain > caption_only_gain:
            gains.append(
                f"seed {s}: none to keep, ETT gains more than caption-only tuning ({ett_gain:+.3f} against "
                f"{caption_only_gain:+.3f})"
            )
        elif caption_only_gain > 0:
            gains.append(f"seed {s}: {ett_gain / caption_only_gain:.3f}")
        else:
            gains.append(f"seed {s}: undefined (caption-only tuning did not beat the frozen arms)")
    share = (
        "share of the caption-only gain in word exact-match that ETT keeps, (ETT - best frozen) / (alpha 0 - best "
        f"frozen): {'; '.join(gains) or 'not measured'}"
    )
    if len(ett_changes) < len(seeds):
        lines.append(
            '- Claim 4, "alpha = 0.25 recovers most of the reconstruction": not judged (no stage-0 tokenizer); '
            f"{share}."
        )
    else:
        within = [s for s, d in zip(seeds, ett_changes) if d >= -1.0]
        lines.append(
            f'- Claim 4, "alpha = 0.25 recovers most of the reconstruction": '
            f"{'holds' if len(within) == len(seeds) else 'does not hold'}: ETT's PSNR is within 1 dB of the stage-0 "
            f"tokenizer's or above it on {len(within)} of {len(seeds)} seeds (ETT minus stage 0: "
            f"{', '.join(f'{d:+.2f}' for d in ett_changes)} dB); {share}."
        )

    if STAGE0 not in results["tokenizers"]:
        lines.append(
            '- Claim 6, "Codebook utilisation stays high under end-to-end tuning": not judged (no stage-0 '
            "tokenizer)."
        )
    else:
        stage0_usage = results["tokenizers"][STAGE0]["usage"]
        ett_usage = {s: arms["ett"][s]["usage"] for s in seeds}
        alpha0_usage = {s: alpha0[s]["usage"] for s in seeds if s in alpha0}
        high = [s for s in seeds if ett_usage[s] >= 0.9 * stage0_usage]
        lines.append(
            '- Claim 6, "Codebook utilisation stays high under end-to-end tuning": '
            f"{'holds' if len(high) == len(seeds) else 'does not hold'}: ETT's codebook usage is at least 0.9 of the "
            f"stage-0 tokenizer's ({stage0_usage:.3f}) on {len(high)} of {len(seeds)} seeds (ETT: "
            f"{usage_list(ett_usage, stage0_usage)}; for contrast, alpha 0: "
            f"{usage_list(alpha0_usage, stage0_usage) or 'not run'})."
        )
    return lines


def write_markdown(results: dict, figures: dict[str, str], out: Path) -> Path:
    arms = results["arms"]
    seeds = sorted(arms["ett"])
    lines = [
        "# ETT demo report: toy-scale comparison on the embedded glyph-grid data",
        "",
        f"Held-out split: {results['num_images']} new renderings (`caption_heldout`); seeds {seeds}. Greedy captions "
        "(KV cache). Word exact-match: all 3 letters right; character accuracy: position-wise over the 3 letters "
        "(chance 0.10); colour accuracy: the background word. Token accuracy is not reported: the colour word and the "
        "caption's fixed form, which every arm learns, dominate it. Brackets: in the mean-over-seeds table [min, max] "
        f"over seeds; in the per-seed tables percentile bootstrap 95% intervals over the {results['num_images']} "
        f"held-out images ({BOOTSTRAP_RESAMPLES:,} resamples with replacement, numpy seed {BOOTSTRAP_SEED}; differences "
        "between arms are paired: the same resampled images for both).",
        "",
        "## Verdict (computed from the numbers below)",
        "",
        *verdict_lines(results),
        "",
        "## Paper claims (computed from the numbers below)",
        "",
        *paper_claim_lines(results),
        "",
        "## Caption accuracy and reconstruction, mean over seeds",
        "",
        "| arm | word exact-match | character accuracy | colour accuracy | PSNR (dB) | SSIM | codebook usage |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, label in ARMS.items():
        if arm not in arms:
            continue
        cells = [
            summarize_arm(arms[arm], k)
            for k in ("word_exact_match", "char_accuracy", "colour_accuracy", "psnr", "ssim", "usage")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Frozen arms keep the stage-0 tokenizer (the control arm: the control tokenizer), so their reconstruction is "
        "that tokenizer's.",
        "",
        "## Every seed, with 95% bootstrap intervals over the held-out images",
        "",
        "| seed | arm | word exact-match [95% CI] | character accuracy [95% CI] | PSNR (dB) | codebook usage |",
        "|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        for arm, label in ARMS.items():
            m = arms.get(arm, {}).get(seed)
            if m is None:
                continue
            lines.append(
                f"| {seed} | {label} | {with_interval(m['word_exact_match'], m['word_exact_match_ci'])} | "
                f"{with_interval(m['char_accuracy'], m['char_accuracy_ci'])} | {m['psnr']:.2f} | {m['usage']:.3f} |"
            )
    lines += [
        "",
        "## ETT minus the best frozen arm, every seed",
        "",
        "Best frozen arm: per seed, whichever of frozen codebook embeddings, frozen indices and the control has the "
        "highest word exact-match. Brackets: paired bootstrap 95% intervals.",
        "",
        "| seed | best frozen arm | word exact-match difference [95% CI] | character accuracy difference [95% CI] |",
        "|---|---|---|---|",
    ]
    for seed, d in results["ett_minus_best_frozen"].items():
        cells = [with_interval(d[k], d[f"{k}_ci"], "+") for k in ("word_exact_match", "char_accuracy")]
        lines.append(f"| {seed} | {ARMS[d['best_frozen']]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Reconstruction before and after stage 2, every seed",
        "",
        "PSNR (dB) on the held-out images: the stage-0 tokenizer (before) against the tokenizer of the ETT arm and of "
        "the alpha-0 arm (after).",
        "",
        "| seed | stage 0 (before) | ETT alpha 0.25 (after) | ETT - stage 0 | ETT alpha 0 (after) | "
        "alpha 0 - stage 0 |",
        "|---|---|---|---|---|---|",
    ]
    for seed, row in results["psnr_before_after"].items():
        cells = [f"{row['stage0']:.2f}"]
        for arm in ("ett", "ett_alpha0"):
            cells += (
                [f"{row[arm]:.2f}", f"{row[arm + '_minus_stage0']:+.2f}"] if arm in row else ["n/a", "n/a"]
            )
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if not results["psnr_before_after"]:
        lines += ["", "Not measured: the run has no stage-0 tokenizer (stage0_tokenizer/final)."]
    lines += [
        "",
        "## Every seed: colour accuracy, SSIM, code perplexity",
        "",
        "| seed | arm | colour accuracy | SSIM | code perplexity |",
        "|---|---|---|---|---|",
    ]
    for seed in seeds:
        for arm, label in ARMS.items():
            m = arms.get(arm, {}).get(seed)
            if m is not None:
                lines.append(
                    f"| {seed} | {label} | {m['colour_accuracy']:.3f} | {m['ssim']:.3f} | {m['perplexity']:.1f} |"
                )
    lines += [
        "",
        "## Vision tokenizers before stage 2",
        "",
        "| tokenizer | PSNR (dB) | SSIM | codebook usage | code perplexity |",
        "|---|---|---|---|---|",
    ]
    for name, m in results["tokenizers"].items():
        lines.append(
            f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['usage']:.3f} | {m['perplexity']:.1f} |"
        )
    lines += ["", "## Stage 3", ""]
    if "chat" in results:
        chat = results["chat"]
        lines.append(
            f"- Chat SFT (seed-1 ETT model, tokenizer frozen; loss on assistant turns only): asked "
            f'"{CHAT_QUESTION}" on the held-out images, the answer names the right letters on '
            f"{chat['word_exact_match']:.3f} of them (character accuracy {chat['char_accuracy']:.3f}). "
            f'Example answer: "{chat["example"]}".'
        )
    if "t2i" in results:
        t2i = results["t2i"]
        lines.append(
            f"- Text-to-image (seed-1 ETT model, tokenizer frozen, visual head over the K codes, caption dropout "
            f"for guidance): next-code loss {t2i['first_loss']:.3f} -> {t2i['last_loss']:.3f} over "
            f"{t2i['steps']} steps (chance ln K = {t2i['chance']:.3f}). `training.infer.generate_image` (guidance 3) "
            f"gave a well-formed {len(t2i['prompts'])}-image set ({t2i['grids_ok']} of {len(t2i['prompts'])} code "
            f"grids of the trained h x w shape); read back by the seed-1 ETT captioner, the letters of the prompt "
            f"come out on {t2i['word_exact_match']:.3f} of them (character accuracy {t2i['char_accuracy']:.3f})."
        )
    lines += ["", "## Figures", ""]
    for title, name in figures.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def t2i_samples(loaded, captioner, prompts: list[str], guidance_scale: float = 3.0) -> dict:
    """Images generated for `prompts` (training.infer.generate_image, seed i for prompt i), checked for a well-formed
    code grid, and read back by the captioning model `captioner` (a LoadedExport): how often it reads the prompt."""
    from training.infer import generate_image

    images, grids_ok = [], 0
    for i, prompt in enumerate(prompts):
        image, codes = generate_image(loaded, prompt, guidance_scale=guidance_scale, seed=i)
        grids_ok += (
            tuple(codes.shape) == loaded.grid
            and 0 <= int(codes.min())
            and int(codes.max()) < (loaded.config.model.tokenizer.codebook_size)
        )
        images.append(image)
    images = torch.stack(images)
    read_back = caption_images(captioner.model, captioner.text_tokenizer, images)
    scores = score_letters(
        [c.split()[-1] if c.split() else "" for c in read_back], [p.split()[-1] for p in prompts]
    )
    return {"images": images, "grids_ok": grids_ok, "read_back": read_back, **scores}


def build_report(run_dir: str | Path, out: str | Path | None = None, max_images: int = 300) -> Path:
    """Evaluate every arm found under `run_dir` and write the report; returns the path of report.md."""
    from training.evaluate import save_image_grid
    from training.infer import load_export

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    seeds = find_seeds(run_dir)
    if not seeds:
        raise FileNotFoundError(
            f"{run_dir}: no finished stage-2 ETT run (s<seed>_ett/final); run the recipe first"
        )
    first_ett = load_export(run_dir / f"s{seeds[0]}_ett" / "final")
    cfg, text_tokenizer = first_ett.config, first_ett.text_tokenizer
    heldout = load_heldout(cfg.data.eval, tuple(cfg.data.image_size), max_images)
    torch.manual_seed(0)
    indices = bootstrap_indices(len(heldout.letters))

    results: dict = {
        "num_images": len(heldout.letters),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": "percentile 95%"},
        "arms": {},
        "tokenizers": {},
    }
    per_image: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    recon_rows = {"input": heldout.images[:8]}
    for name, label in (("stage0_tokenizer", STAGE0), ("tokenizer_control", "control")):
        if (run_dir / name / "final").is_dir():
            tokenizer = load_export(run_dir / name / "final").model.tokenizer
            results["tokenizers"][label] = reconstruction_metrics(tokenizer, heldout.images)
            recon_rows[label] = reconstruct(tokenizer, heldout.images[:8])
    grid_captions: dict[str, list[str]] = {}
    for arm in ARMS:
        for seed in seeds:
            handoff = run_dir / f"s{seed}_{arm}" / "final"
            if not handoff.is_dir():
                continue
            model = load_export(handoff).model
            captions = caption_images(model, text_tokenizer, heldout.images)
            metrics, hits = score_captions(captions, heldout)
            for key, values in hits.items():
                metrics[f"{key}_ci"] = percentile_interval(values, indices)
            metrics.update(reconstruction_metrics(model.tokenizer, heldout.images))
            results["arms"].setdefault(arm, {})[seed] = metrics
            per_image.setdefault(arm, {})[seed] = hits
            if seed == seeds[0]:
                grid_captions[arm] = captions
                if arm in ("ett", "ett_alpha0"):
                    recon_rows[f"{SHORT_LABELS[arm]} (seed {seed})"] = reconstruct(
                        model.tokenizer, heldout.images[:8]
                    )
            print(
                f"[report] seed {seed} {arm:22s} word EM {metrics['word_exact_match']:.3f}  "
                f"char {metrics['char_accuracy']:.3f}  PSNR {metrics['psnr']:.2f}",
                flush=True,
            )
    results["ett_minus_best_frozen"] = ett_minus_best_frozen(results["arms"], per_image, indices)
    results["psnr_before_after"] = psnr_before_after(results)
    results["per_image"] = {
        arm: {seed: {key: values.tolist() for key, values in hits.items()} for seed, hits in by_seed.items()}
        for arm, by_seed in per_image.items()
    }
    if (run_dir / "chat_sft" / "final").is_dir():
        model = load_export(run_dir / "chat_sft" / "final").model
        answers = []
        for start in range(0, heldout.images.shape[0], 100):
            answers += generate_after_images(
                model,
                text_tokenizer,
                heldout.images[start : start + 100],
                CHAT_QUESTION,
                chat=True,
                max_new_tokens=24,
            )
        chat = score_letters(chat_letters(answers), heldout.letters)
        results["chat"] = {**chat, "example": answers[0]}
    figures = {}
    if (run_dir / "t2i" / "final").is_dir():
        steps, losses = curve(read_metrics(run_dir / "t2i"), "loss/t2i")
        prompts = [f"{c} {w}" for c, w in zip(heldout.colours[:8], heldout.letters[:8])]
        samples = t2i_samples(load_export(run_dir / "t2i" / "final"), first_ett, prompts)
        results["t2i"] = {
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "steps": steps[-1],
            "chance": math.log(cfg.model.tokenizer.codebook_size),
            "prompts": prompts,
            **{k: v for k, v in samples.items() if k != "images"},
        }
        save_image_grid([samples["images"]], out / "t2i_samples.png")
        figures["Text-to-image samples (guidance 3; prompts: " + ", ".join(prompts) + ")"] = "t2i_samples.png"
    figures["Loss curves"] = plot_loss_curves(run_dir, seeds, out).name
    figures[f"Held-out images with each arm's caption (seed {seeds[0]})"] = plot_caption_grid(
        heldout, grid_captions, out
    ).name
    figures["Reconstructions (rows: " + ", ".join(recon_rows) + ")"] = plot_reconstructions(
        recon_rows, out
    ).name
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return write_markdown(results, figures, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--run-dir", required=True, help="the demo recipe's output_dir (e.g. runs/demo)")
    parser.add_argument("--out", default=None, help="report directory (default: RUN_DIR/report)")
    parser.add_argument("--max-images", type=int, default=300, help="held-out images to evaluate on")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir, args.out, args.max_images)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
