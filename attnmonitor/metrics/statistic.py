"""torchmetrics ``Metric`` classes for your own loops: per-(layer, head) means of one attention statistic.

The classes only hold state (``[num_layers, num_heads]`` sums and valid-row counts, reduced with
``"sum"`` so DDP results are exact; for ``max_logit``, maxima reduced with ``"max"``);
:func:`attnmonitor.functional.row_statistics` does the arithmetic (as torchmetrics'
``MeanSquaredError`` over its functional twin).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from attnmonitor.functional.statistics import (
    MAX_STATISTICS,
    check_statistics,
    head_max,
    head_sums,
    logit_row_max,
    max_row_counts,
    mean_from_sums,
    row_statistics,
)


class AttentionStatistic(Metric):
    """Mean of one statistic per (layer, head) over every valid query row seen since ``reset``; for
    ``max_logit``, the maximum (its state ``maxima`` is reduced with ``"max"`` across processes, and
    :meth:`update` takes the logits, the softmax's input, instead of probabilities).

    Args:
        statistic: a name from :data:`attnmonitor.functional.STATISTICS`.
        num_layers: rows of the state.
        num_heads: columns of the state.
        sink_tokens: leading keys counted by ``sink_mass``.
        sparsity_eps: threshold factor of ``sparsity``.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).

    Example:
        >>> metric = AttentionStatistic("max_weight", num_layers=2, num_heads=1)
        >>> metric.update(torch.tensor([[[[0.9, 0.1], [0.5, 0.5]]]]), layer=1)
        >>> metric.compute()
        tensor([[0.0000],
                [0.7000]])
        >>> metric.counts
        tensor([[0.],
                [2.]])
        >>> logits = torch.tensor([[[[2.0, float("-inf")], [0.5, -1.0]], [[-3.0, -1.0], [4.0, 9.0]]]])  # [1, 2, 2, 2]
        >>> peak = AttentionStatistic("max_logit", num_heads=2)  # update takes the softmax's input
        >>> peak.update(logits, query_valid=torch.tensor([True, False]))
        >>> peak.compute()
        tensor([[ 2., -1.]])
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    sums: Tensor
    maxima: Tensor
    counts: Tensor

    def __init__(
        self,
        statistic: str,
        num_layers: int = 1,
        num_heads: int = 1,
        *,
        sink_tokens: int = 1,
        sparsity_eps: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        (self.statistic,) = check_statistics([statistic], option="statistic")
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"`num_layers` and `num_heads` must be >= 1, got {num_layers} and {num_heads}")
        self.sink_tokens, self.sparsity_eps = sink_tokens, sparsity_eps
        self.maximum = self.statistic in MAX_STATISTICS
        if self.maximum:
            self.add_state("maxima", torch.full((num_layers, num_heads), float("-inf")), dist_reduce_fx="max")
        else:
            self.add_state("sums", torch.zeros(num_layers, num_heads), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_layers, num_heads), dist_reduce_fx="sum")

    def update(self, probs: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None, *, layer: int = 0) -> None:
        """Add the valid rows of one attention tensor of layer ``layer``.

        Args:
            probs: ``[B, H, Lq, Lk]`` probabilities; for ``max_logit``, the logits the softmax sees
                (scaled scores plus biases; masked keys ``-inf`` or ``<= finfo.min / 2``).
            key_valid: bool, broadcastable to ``probs``; True where a key may be attended.
            query_valid: bool, broadcastable to ``[B, H, Lq]``; False for padded query rows.
            layer: row of the state that ``probs`` belongs to.
        """
        if self.maximum:
            row_max = logit_row_max(probs.detach(), key_valid)  # [B, H, Lq]
            self.maxima[layer] = torch.maximum(self.maxima[layer], head_max(row_max, query_valid).to(self.maxima))
            self.counts[layer] += max_row_counts(row_max, query_valid)
            return
        values, valid = row_statistics(
            probs, key_valid, query_valid, statistics=[self.statistic], sink_tokens=self.sink_tokens, sparsity_eps=self.sparsity_eps
        )
        head_sum, head_count = head_sums(values, valid)
        self.sums[layer] += head_sum[self.statistic]
        self.counts[layer] += head_count

    def compute(self) -> Tensor:
        """``[num_layers, num_heads]`` means, or maxima (0 where no row was seen: check :attr:`counts`)."""
        if self.maximum:
            return self.maxima.masked_fill(self.counts <= 0, 0.0)
        return mean_from_sums(self.sums, self.counts)


def _statistic_class(statistic: str, doc: str) -> type[AttentionStatistic]:
    def __init__(self: AttentionStatistic, num_layers: int = 1, num_heads: int = 1, **kwargs: Any) -> None:
        AttentionStatistic.__init__(self, statistic, num_layers, num_heads, **kwargs)

    name = "Attention" + "".join(part.title() for part in statistic.split("_"))
    return type(name, (AttentionStatistic,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


AttentionEntropy = _statistic_class("entropy", "Row entropy ``-sum_j A_ij log A_ij`` (nats).")
AttentionNormalizedEntropy = _statistic_class("normalized_entropy", "Entropy divided by ``log n_i``.")
AttentionMaxWeight = _statistic_class("max_weight", "Largest weight of each row (head confidence).")
AttentionSparsity = _statistic_class("sparsity", "Fraction of valid keys with weight below ``eps / n_i``.")
AttentionEffectiveSupport = _statistic_class("effective_support", "``exp(entropy)``: keys effectively attended.")
AttentionDistance = _statistic_class("distance", "Mean attention distance ``sum_j A_ij |i - j|``.")
AttentionSelfWeight = _statistic_class("self_weight", "Weight on the query's own position ``A_ii``.")
AttentionPrevTokenWeight = _statistic_class("prev_token_weight", "Weight on the previous token ``A_i,i-1``.")
AttentionNextTokenWeight = _statistic_class("next_token_weight", "Weight on the next token ``A_i,i+1``.")
AttentionSinkMass = _statistic_class("sink_mass", "Mass on the first ``sink_tokens`` keys.")
AttentionMaxLogit = _statistic_class(
    "max_logit", "Largest pre-softmax logit over valid rows and keys (reduced with max; ``update`` takes logits)."
)
