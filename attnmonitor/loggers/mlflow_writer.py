"""Figures to an MLflow run."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

ARTIFACTS = "attnmonitor"
"""Artifact folder of the tables and histograms (images go where ``log_image`` puts them: ``images/``)."""


class MLflowWriter:
    """Images through ``MlflowClient.log_image(key=tag, step=step)`` (the UI's image slider), Markdown
    tables as ``attnmonitor/<tag>/step_<N>.md`` artifacts, histogram values as ``.json`` artifacts.

    Args:
        client: an ``mlflow.MlflowClient`` (``MLFlowLogger.experiment``).
        run_id: the run (``MLFlowLogger.run_id``, ``mlflow.active_run().info.run_id``).
    """

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def add_image(self, tag: str, img_tensor: Any, global_step: int, dataformats: str = "HWC") -> None:
        self.client.log_image(self.run_id, np.asarray(img_tensor), key=tag, step=global_step)

    def add_histogram(self, tag: str, values: Any, global_step: int) -> None:
        data = {"step": global_step, "values": np.asarray(values, dtype=np.float64).tolist()}
        self.client.log_text(self.run_id, json.dumps(data), f"{ARTIFACTS}/{tag}/step_{global_step}.json")

    def add_text(self, tag: str, text_string: str, global_step: int) -> None:
        self.client.log_text(self.run_id, text_string, f"{ARTIFACTS}/{tag}/step_{global_step}.md")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """The plain loop's scalars (the Lightning and Hugging Face loggers log their own)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        """Every call above is synchronous: nothing to do."""
