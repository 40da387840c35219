"""Training metrics to a JSON-lines file and to TensorBoard event files (tensorboardX: no TensorFlow needed).

The only module that imports tensorboardX.
"""

from __future__ import annotations

import json
import os


class MetricWriter:
    """Appends {"step": s, **scalars} to workdir/metrics.jsonl and writes the same scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: dict) -> None:
        """Logs float scalars for one step."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))

    def write_image(self, step: int, name: str, image) -> None:
        """Logs a uint8 [H, W, 3] picture to TensorBoard."""
        if self.enabled:
            self._tb.add_image(name, image, int(step), dataformats="HWC")

    def close(self) -> None:
        """Flushes and closes both sinks."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
