"""A real Lightning Trainer for the tests: quiet, logging to TensorBoard under ``tmp_path``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

_POSSIBLE_USER_WARNING = "lightning.fabric.utilities.warnings.PossibleUserWarning"

ignore_few_batches = pytest.mark.filterwarnings(
    f"ignore:The number of training batches .* is smaller than the logging interval:{_POSSIBLE_USER_WARNING}"
)
"""Filter Lightning's notice that an epoch has fewer batches than ``log_every_n_steps`` (tiny test loaders)."""

ignore_no_validation_data = pytest.mark.filterwarnings(
    f"ignore:You defined a `validation_step` but have no `val_dataloader`:{_POSSIBLE_USER_WARNING}"
)
"""Filter Lightning's notice that a module's ``validation_step`` goes unused (a fit without validation data)."""

ignore_eval_mode_at_start = pytest.mark.filterwarnings(f"ignore:Found .* module\\(s\\) in eval mode:{_POSSIBLE_USER_WARNING}")
"""Filter Lightning's notice that training starts with modules in eval mode."""

ignore_resume_notices = pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty:UserWarning",
    f"ignore:You're resuming from a checkpoint that ended before the epoch ended:{_POSSIBLE_USER_WARNING}",
)
"""Filter Lightning's notices about a reused checkpoint directory and a resume in the middle of an epoch."""


def make_trainer(tmp_path: str | Path, callbacks: Sequence[L.Callback], **overrides: Any) -> L.Trainer:
    """A ``lightning.Trainer`` writing TensorBoard events to ``tmp_path/tb/version_0``.

    No progress bar, model summary, checkpointing or sanity validation; any of these, and every other
    Trainer argument, can be set through ``overrides``.
    """
    options: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**options, **overrides})
