"""Per-step training metrics as JSONL (`metrics.jsonl`, one object per optimiser step) and
TensorBoard scalars (`tensorboard/`), and to the experiment trackers when configured (MLflow / W&B:
opsft.train.tracking; the same numeric scalars, at the same step). Written by rank 0 only. On resume from step s the
lines after step s are dropped (and TensorBoard purges them), so the files show one
curve even when a run crashed after its last checkpoint.

    tensorboard --logdir <output_dir>/tensorboard
"""

from __future__ import annotations

import json
from pathlib import Path

from opsft.data.corpus import write_text_atomic


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    def __init__(self, output_dir: str | Path, start_step: int = 0, tensorboard: bool = True, tracker=None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        kept = [m for m in read_metrics(self.path) if m.get("step", 0) <= start_step] if start_step else []
        write_text_atomic(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.tracker = tracker  # opsft.train.tracking.Tracker or None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = start_step + 1 if start_step else None
                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            step = int(metrics["step"])
            for key, value in metrics.items():
                if key != "step" and isinstance(value, int | float):
                    group = "eval" if key.startswith("eval_") else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, step)
        if self.tracker is not None:
            self.tracker.log_metrics(int(metrics["step"]), metrics)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
