"""How the regularizer's penalty enters a Lightning training step, and how its terms are logged.

Lightning offers a callback no way to change the loss (``on_before_backward`` sees an already scaled
loss). The monitor therefore wraps the module's ``training_step`` for the duration of ``fit`` (undone
at teardown) and adds the penalty to the loss it returns, so gradient accumulation, precision
plugins and the loss normalisation all apply to the sum. Under manual optimization nothing is
wrapped: the user adds :meth:`LossInjection.penalty` (``AttentionMonitor.penalty()``) to the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from attnmonitor.regularization.regularizer import AttentionRegularizer
from attnmonitor.tensorboard import tags


class LossInjection:
    """The penalty of an :class:`AttentionRegularizer` added to a LightningModule's loss."""

    def __init__(self, regularizer: AttentionRegularizer) -> None:
        self.regularizer = regularizer
        self._module: pl.LightningModule | None = None
        self._terms: dict[str, Tensor | None] | None = None
        self._last_penalty: Tensor | None = None

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Wrap ``pl_module.training_step`` (automatic optimization with an enabled regularizer only)."""
        config = self.regularizer.regularizer
        if config is None or not config.enabled or not pl_module.automatic_optimization:
            return
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            penalty = self.penalty()
            self.regularizer.regularizing = False  # a checkpointing recompute in backward must not add terms
            return add_to_loss(output, penalty)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._module = pl_module

    def detach(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module = None

    def penalty(self) -> Tensor:
        """The penalty for the attention computed since the last call (0-dim tensor)."""
        penalty = self.regularizer.penalty()
        self._last_penalty, self._terms = penalty.detach(), self.regularizer.terms
        return penalty

    def log(self, pl_module: pl.LightningModule) -> None:
        """Log the step's terms and clipped fraction (``attn/reg/*``).

        Raises:
            RuntimeError: if the penalty was computed but never added to a loss.
        """
        regularizing, self.regularizer.regularizing = self.regularizer.regularizing, False
        if regularizing and self.regularizer.pending:
            self.regularizer.discard()
            raise RuntimeError(
                "attnmonitor: the attention regularizer's penalty was computed but never added to a loss. With manual "
                "optimization (or a training_step the monitor cannot wrap) add it yourself: "
                "`self.manual_backward(loss + monitor.penalty())`."
            )
        if self._terms is not None:
            for name, term in self._terms.items():
                if term is not None:
                    pl_module.log(tags.regularization(name), term.detach(), on_step=True, on_epoch=False)
            pl_module.log(tags.regularization("penalty"), self._last_penalty, on_step=True, on_epoch=False)
            self._terms = None
        fraction = self.regularizer.clip_fraction() if self.regularizer.clip is not None else None
        if fraction is not None:
            pl_module.log(tags.regularization("clip_fraction"), fraction, on_step=True, on_epoch=False)


def add_to_loss(output: Any, penalty: Tensor) -> Any:
    """``training_step`` output with ``penalty`` added to its loss (a tensor or a mapping's ``"loss"``)."""
    if isinstance(output, Tensor):
        return output + penalty
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"] + penalty}
    return output  # None skips the step: nothing to add
