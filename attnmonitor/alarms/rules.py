"""The alarm rules and their options: each reads a layer's history and grades every head.

A rule returns a severity per head: ``info`` (a head changed the way learning changes it: logged,
quiet), ``warning`` (growth outside what the head did before) or ``critical`` (the pattern that
preceded every attention-driven divergence of the health suite, ``benchmarks/health_suite.py``).
The defaults were chosen by a written procedure on the suite's families, each round checked on a
family it did not see (``docs/alarms.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from attnmonitor.alarms.history import LayerHistory
from attnmonitor.checks import check_int, check_number

SEVERITIES = ("info", "warning", "critical")
"""Severity names; a rule grades each head 0 (quiet) or 1 + the index of its severity here."""
INFO, WARNING, CRITICAL = 1, 2, 3


def recent_log_logit(history: LayerHistory, now: Tensor | None, step: int, span: int) -> Tensor | None:
    """``[H]`` mean ``log(max_logit)`` over the captures of the last quarter span up to ``step`` (with
    ``now``, this capture's values, if given; one capture's noise does not decide); None without any."""
    return history.log_mean("max_logit", step - span / 4, step, now)


def growth(
    history: LayerHistory, recent: Tensor | None, step: int, span: int, floor: float, heads: int, from_floor: bool = False
) -> Tensor:
    """``[H]`` factor by which ``max_logit`` grew over ``span`` steps up to ``step``: ``recent``
    (:func:`recent_log_logit`) over the geometric mean of the quarter span ending ``span`` steps
    earlier. Where the earlier value is below ``floor`` (the softmax was not saturated: growth up to
    there is a head learning where to attend) the growth is measured from ``floor`` if
    ``from_floor``, else NaN. NaN where no capture is that old."""
    earlier = history.log_mean("max_logit", step - 5 * span / 4, step - span)
    if recent is None or earlier is None:
        return torch.full((heads,), math.nan)
    log_floor = math.log(max(floor, 1e-30))
    if from_floor:
        return (recent - earlier.clamp(min=log_floor)).exp()
    return torch.where(earlier >= log_floor, (recent - earlier).exp(), math.nan)


def still_growing(history: LayerHistory, recent: Tensor, step: int, span: int, factor: float) -> Tensor:
    """``[H]`` whether ``recent`` (:func:`recent_log_logit` with this capture) is above the mean
    ``log(max_logit)`` of the quarter span before it by at least an eighth of ``factor``'s logarithm
    (half the rate ``factor`` per span): a head that grew and levelled off, as one that learned, is no
    longer growing."""
    before = history.log_mean("max_logit", step - span / 2, step - span / 4)
    if before is None:
        return torch.zeros_like(recent, dtype=torch.bool)
    return recent - before >= math.log(factor) / 8


@dataclass
class AlarmRule:
    """What every rule has: the statistics it reads and how it grades heads."""

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    value_of: ClassVar[str] = ""
    """The statistic a firing reports."""
    hint: ClassVar[str] = ""
    """The usual remedies, shown with a warning or critical firing."""

    @property
    def span_steps(self) -> int:
        """Steps of history the rule reads; also how long an episode stays quiet before it clears."""
        return 0

    def grade(self, history: LayerHistory, now: Mapping[str, Tensor], step: int) -> Tensor:
        """``[H]`` int severity of every head of a layer (0: quiet), from ``now`` (``{statistic: [H]}``
        of this capture; NaN: not observed) and the layer's earlier captures."""
        raise NotImplementedError


@dataclass
class LogitGrowthConfig(AlarmRule):
    """A head's largest attention logit (``max_logit``) growing geometrically.

    ``warning``: ``max_logit`` grew by ``factor`` or more over the last ``span`` steps, from a value
    above ``floor``, and is still growing (its last quarter span above the quarter before).
    ``critical``: it did so over each of the last ``sustain`` spans, for at least
    ``heads_fraction`` of the layer's heads. A head that learns a sharp pattern grows its logits
    once and levels off; the runs of the health suite that diverged through attention grew theirs by
    a constant factor per span, in most heads of a layer, until the loss broke.

    Attributes:
        span: steps over which growth is measured.
        factor: growth per span that is a ``warning`` (> 1).
        sustain: consecutive spans of such growth that are ``critical``.
        heads_fraction: share of a layer's heads growing that way for ``critical`` (0: any head).
        floor: below this the softmax is not saturated and a head is still learning where to attend:
            growth up to ``floor`` does not count.
        from_below_floor: a head that was below ``floor`` a span ago has its growth measured from
            ``floor`` (growth past it counts); False: such a head is not graded.
        ceiling: an absolute limit of ``max_logit`` that is a ``warning`` (published values range from
            12 to 100; healthy heads of the suite pass 1,000); None: off.
    """

    name: ClassVar[str] = "logit_growth"
    reads: ClassVar[tuple[str, ...]] = ("max_logit",)
    value_of: ClassVar[str] = "max_logit"
    hint: ClassVar[str] = "usual remedies: a lower learning rate, `qk_clip` (tau about 100), or qk-layernorm in the model"

    span: int = 50
    factor: float = 3.0
    sustain: int = 1
    heads_fraction: float = 0.75
    floor: float = 20.0
    from_below_floor: bool = False
    ceiling: float | None = None

    def __post_init__(self) -> None:
        check_int("alarms.logit_growth.span", self.span, 1)
        check_number("alarms.logit_growth.factor", self.factor, 1.0)
        check_int("alarms.logit_growth.sustain", self.sustain, 1)
        check_number("alarms.logit_growth.heads_fraction", self.heads_fraction, 0.0, 1.0)
        check_number("alarms.logit_growth.floor", self.floor, 0.0)
        check_number("alarms.logit_growth.ceiling", self.ceiling, 0.0, optional=True)

    @property
    def span_steps(self) -> int:
        return self.span * self.sustain + self.span // 4

    def grade(self, history: LayerHistory, now: Mapping[str, Tensor], step: int) -> Tensor:
        logits = now["max_logit"]
        recent = recent_log_logit(history, logits, step, self.span)
        grows = growth(history, recent, step, self.span, self.floor, len(logits), self.from_below_floor) >= self.factor  # NaN: False
        grows &= still_growing(history, recent, step, self.span, self.factor)
        sustained = grows.clone()
        for k in range(1, self.sustain):
            then = step - k * self.span
            earlier = growth(
                history, recent_log_logit(history, None, then, self.span), then, self.span, self.floor, len(logits), self.from_below_floor
            )
            sustained &= earlier >= self.factor
        severity = torch.where(grows, WARNING, 0)
        if self.ceiling is not None:
            severity = torch.where(logits > self.ceiling, WARNING, severity)
        observed = (~logits.isnan()).sum().clamp(min=1)
        if sustained.sum() / observed >= max(self.heads_fraction, 1e-9):
            severity = torch.where(sustained, CRITICAL, severity)
        return severity


@dataclass
class EntropyCollapseConfig(AlarmRule):
    """A head's normalised entropy falling.

    ``info``: it fell below ``(1 − drop)`` times its mean over the last ``span`` steps, by at least
    ``min_drop`` (a head learning a sharp pattern: copy, induction and alignment heads do this).
    ``warning``: and its ``max_logit`` grew by ``logit_factor`` or more over the same span (from
    above ``logit_floor``), which a head that only learned does not keep doing.

    Attributes:
        span: steps of history the head is compared with.
        drop: relative fall, in (0, 1).
        min_drop: smallest absolute fall (normalised entropy is in [0, 1]).
        logit_factor: growth of ``max_logit`` over the span that makes the fall a ``warning``; None:
            never a warning.
        logit_floor: growth is measured from values above this only (as ``logit_growth.floor``
            with ``from_below_floor=False``).
    """

    name: ClassVar[str] = "entropy_collapse"
    reads: ClassVar[tuple[str, ...]] = ("normalized_entropy", "max_logit")
    value_of: ClassVar[str] = "normalized_entropy"
    hint: ClassVar[str] = "with growing logits this is how attention-logit divergence starts: see `logit_growth`"

    span: int = 50
    drop: float = 0.5
    min_drop: float = 0.1
    logit_factor: float | None = 3.0
    logit_floor: float = 20.0

    def __post_init__(self) -> None:
        check_int("alarms.entropy_collapse.span", self.span, 1)
        check_number("alarms.entropy_collapse.drop", self.drop, 0.0, 1.0)
        check_number("alarms.entropy_collapse.min_drop", self.min_drop, 0.0, 1.0)
        check_number("alarms.entropy_collapse.logit_factor", self.logit_factor, 1.0, optional=True)
        check_number("alarms.entropy_collapse.logit_floor", self.logit_floor, 0.0)

    @property
    def span_steps(self) -> int:
        return self.span + self.span // 4

    def grade(self, history: LayerHistory, now: Mapping[str, Tensor], step: int) -> Tensor:
        entropy = now["normalized_entropy"]
        mean = history.mean("normalized_entropy", step - self.span)
        if mean is None:
            return torch.zeros_like(entropy, dtype=torch.long)
        fell = (entropy < (1 - self.drop) * mean) & (mean - entropy >= self.min_drop)
        severity = torch.where(fell, INFO, 0)
        if self.logit_factor is not None:
            recent = recent_log_logit(history, now["max_logit"], step, self.span)
            grew = growth(history, recent, step, self.span, self.logit_floor, len(entropy)) >= self.logit_factor
            severity = torch.where(fell & grew, WARNING, severity)
        return severity


@dataclass
class SinkJumpConfig(AlarmRule):
    """A head's ``sink_mass`` moving by more than ``jump`` from its mean over the last ``span`` steps:
    ``info`` (heads gain and lose sinks as they learn).

    Attributes:
        span: steps of history the head is compared with.
        jump: absolute change, in (0, 1].
    """

    name: ClassVar[str] = "sink_jump"
    reads: ClassVar[tuple[str, ...]] = ("sink_mass",)
    value_of: ClassVar[str] = "sink_mass"

    span: int = 50
    jump: float = 0.3

    def __post_init__(self) -> None:
        check_int("alarms.sink_jump.span", self.span, 1)
        check_number("alarms.sink_jump.jump", self.jump, 0.0, 1.0)

    @property
    def span_steps(self) -> int:
        return self.span

    def grade(self, history: LayerHistory, now: Mapping[str, Tensor], step: int) -> Tensor:
        sink = now["sink_mass"]
        mean = history.mean("sink_mass", step - self.span)
        if mean is None:
            return torch.zeros_like(sink, dtype=torch.long)
        return torch.where((sink - mean).abs() > self.jump, INFO, 0)
