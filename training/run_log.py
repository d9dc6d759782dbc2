"""Run logging: rank-0 console logging, a progress bar, TensorBoard scalars and a JSONL metrics file.

    log = RunLogger(run_dir, rank=rank, total_steps=1000, desc="stage2_ett")
    log.metrics(step, {"loss/total": 2.3, "lr": 1e-4})   # -> metrics.jsonl, TensorBoard, progress-bar postfix
    log.advance()                                          # one step done
    log.close()

Only rank 0 writes; on other ranks every call is a no-op, so callers never branch on rank.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

LOGGER_NAME = "ett"


def get_logger(rank: int = 0) -> logging.Logger:
    """The project logger: INFO on rank 0 (with a rank tag), WARNING on other ranks."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


class RunLogger:
    """Metrics sink for one run directory: `metrics.jsonl`, TensorBoard event files under `tb/`, and a tqdm bar."""

    def __init__(
        self,
        run_dir: str | Path,
        rank: int = 0,
        total_steps: int | None = None,
        initial_step: int = 0,
        desc: str = "train",
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        self._jsonl = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if progress:
            self._bar = tqdm(
                total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, file=sys.stderr
            )

    def metrics(self, step: int, values: dict[str, float], postfix: bool = True) -> None:
        """Record scalar metrics for `step` in JSONL and TensorBoard; show the main ones on the progress bar."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        record = {
            "step": step,
            "time": time.time(),
            **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()},
        }
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
        if self._bar is not None and postfix:
            shown = {
                k.split("/")[-1]: f"{v:.4g}" for k, v in clean.items() if k.startswith("loss") or k == "lr"
            }
            self._bar.set_postfix(shown, refresh=False)

    def image(self, tag: str, step: int, image_chw) -> None:
        """Add an image ([3, H, W] float in [0, 1]) to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_chw, step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Read back `metrics.jsonl` of a run (one dict per logged step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
