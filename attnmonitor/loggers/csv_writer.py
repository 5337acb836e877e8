"""Figures (and the plain loop's scalars) to files in a folder."""

from __future__ import annotations

import csv
import threading
from pathlib import Path
from typing import Any

import numpy as np


class CSVWriter:
    """``images/<tag>/step_<N>.png``, ``text/<tag>/step_<N>.md``, and rows of ``histograms.csv``
    (``step, tag, values``) and ``scalars.csv`` (``step, tag, value``: long format, so tags may come and go).

    Args:
        folder: created if missing (``CSVLogger.log_dir`` in Lightning).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def _file(self, kind: str, tag: str, step: int, suffix: str) -> Path:
        path = self.folder / kind / tag / f"step_{step}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _append(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        path = self.folder / name
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with path.open("a", newline="") as handle:
                out = csv.writer(handle)
                if new:
                    out.writerow(header)
                out.writerows(rows)

    def add_image(self, tag: str, img_tensor: Any, global_step: int, dataformats: str = "HWC") -> None:
        from PIL import Image

        Image.fromarray(np.asarray(img_tensor)).save(self._file("images", tag, global_step, ".png"))

    def add_histogram(self, tag: str, values: Any, global_step: int) -> None:
        joined = " ".join(f"{v:.7g}" for v in np.asarray(values, dtype=np.float64).ravel())
        self._append("histograms.csv", ["step", "tag", "values"], [[global_step, tag, joined]])

    def add_text(self, tag: str, text_string: str, global_step: int) -> None:
        self._file("text", tag, global_step, ".md").write_text(text_string)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._append("scalars.csv", ["step", "tag", "value"], [[step, tag, value] for tag, value in scalars.items()])

    def flush(self) -> None:
        """Every file is closed after each write: nothing to do."""
