"""Metrics out of the loop: one JSON line per logged step, and TensorBoard scalars (tensorboardX, no TF)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

import jax

from persguard_jax.io import read_jsonl


class MetricsWriter:
    """Appends ``{"step": s, "time": t, **metrics}`` to ``<workdir>/metrics.jsonl`` and writes TensorBoard events
    under ``<workdir>/tensorboard``. Only process 0 writes."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _drop_partial_line(path: Path) -> None:
    """Cut what follows the last newline: the half-written record of a run killed mid-write, which the resumed
    run's first record would otherwise be glued to."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a resumed run may repeat steps: the later record wins)."""
    return read_jsonl(path, unique="step")


def logged_metrics(path: str | Path, step: int) -> dict:
    """The metrics logged at ``step`` (without ``step`` and ``time``), {} if that step has no record: what a run
    resumed at its last step reports, having run no step itself."""
    path = Path(path)
    record = next((r for r in read_metrics(path) if r["step"] == step), {}) if path.is_file() else {}
    return {k: v for k, v in record.items() if k not in ("step", "time")}
