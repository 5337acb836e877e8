"""The regularizer's penalty as every training loop hands it to its loss: taken once per micro-batch,
checked (a penalty computed and never added is warned about and dropped: the monitor never stops
training), and averaged for logging.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from attnmonitor.regularization.regularizer import AttentionRegularizer
from attnmonitor.tensorboard import tags


class PenaltyTracker:
    """Hands out the penalty of an :class:`AttentionRegularizer` and keeps its logged values.

    One call of :meth:`penalty` per training micro-batch, after the forward; :meth:`end_batch` after
    the micro-batch; :meth:`scalars` when the loop logs (means over the micro-batches since the last
    call).

    Args:
        regularizer: the engine's regularizer (penalty terms and clipping).

    Example:
        >>> tracker = PenaltyTracker(AttentionRegularizer(regularizer={"entropy_weight": 0.1}))
        >>> tracker.scalars()  # nothing regularized yet
        {}
    """

    def __init__(self, regularizer: AttentionRegularizer) -> None:
        self.regularizer = regularizer
        self._sums: dict[str, float] = {}
        self._batches = 0
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether the regularizer has a penalty (a weight > 0) at all."""
        config = self.regularizer.regularizer
        return config is not None and config.enabled

    @property
    def logs(self) -> bool:
        """Whether :meth:`scalars` can have anything to log (a penalty, or clipping)."""
        return self.enabled or self.regularizer.clip is not None

    @property
    def collecting(self) -> bool:
        """Whether penalty terms are being collected now (a training micro-batch since its start)."""
        return self.regularizer.regularizing

    def penalty(self) -> Tensor:
        """The penalty of the attention computed since the last call (0-dim tensor, differentiable).

        Stops collecting until the next micro-batch starts (a recompute under activation
        checkpointing adds nothing).

        Raises:
            RuntimeError: if the captured attention carried no gradient (see
                :meth:`AttentionRegularizer.penalty`).
        """
        penalty = self.regularizer.penalty()
        self.regularizer.regularizing = False  # a checkpointing recompute in backward must not add terms
        terms = {name: term for name, term in self.regularizer.terms.items() if term is not None}
        if terms:
            for name, value in {**terms, "penalty": penalty}.items():
                self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
            self._batches += 1
        return penalty

    def end_batch(self) -> None:
        """After a training micro-batch: a penalty computed but never taken is warned about (once) and dropped."""
        regularizing, self.regularizer.regularizing = self.regularizer.regularizing, False
        if regularizing and self.regularizer.pending:
            self.regularizer.discard()
            if not self._warned:
                self._warned = True
                message = (
                    "attnmonitor: the attention regularizer's penalty was computed but never added to a loss, so it "
                    "changes nothing. Add `monitor.penalty()` to the loss after the forward (Lightning with manual "
                    "optimization: `self.manual_backward(loss + monitor.penalty())`; with the Hugging Face Trainer, use "
                    "`AttentionMonitorTrainer` or `AttentionMonitorMixin`)."
                )
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def scalars(self) -> dict[str, float]:
        """``attn_reg/*``: means of the unweighted terms and of the penalty over the micro-batches since
        the last call, and the fraction of clipped weights; resets."""
        out = {tags.regularization(name): total / self._batches for name, total in self._sums.items()} if self._batches else {}
        self._sums, self._batches = {}, 0
        fraction = self.regularizer.clip_fraction() if self.regularizer.clip is not None else None
        if fraction is not None:
            out[tags.regularization("clip_fraction")] = fraction
        return out
