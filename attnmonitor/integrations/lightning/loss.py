"""How the regularizer's penalty enters a Lightning training step.

Lightning offers a callback no way to change the loss (``on_before_backward`` sees an already scaled
loss). The monitor therefore wraps the module's ``training_step`` for the duration of ``fit`` (undone
at teardown) and adds the penalty to the loss it returns, so gradient accumulation, precision
plugins and the loss normalisation all apply to the sum. Under manual optimization nothing is
wrapped: the user adds ``AttentionMonitor.penalty()`` to the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor


class TrainingStepWrapper:
    """Adds ``penalty()`` to the loss a LightningModule's ``training_step`` returns, while attached.

    Args:
        penalty: returns the penalty of the attention computed since its last call (0-dim tensor).
    """

    def __init__(self, penalty: Callable[[], Tensor]) -> None:
        self.penalty = penalty
        self._module: pl.LightningModule | None = None

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Wrap ``pl_module.training_step`` (automatic optimization only)."""
        if not pl_module.automatic_optimization or self._module is not None:
            return
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return add_to_loss(original(*args, **kwargs), self.penalty())

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._module = pl_module

    def detach(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module = None


def add_to_loss(output: Any, penalty: Tensor) -> Any:
    """``training_step`` output with ``penalty`` added to its loss (a tensor or a mapping's ``"loss"``)."""
    if isinstance(output, Tensor):
        return output + penalty
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"] + penalty}
    return output  # None skips the step: nothing to add
