"""``AttentionMonitorLoop``: the monitor in a hand-written PyTorch training loop, or under Lightning Fabric.

A thin adapter over :class:`attnmonitor.engine.MonitorEngine`: the loop says when a micro-batch of
an optimizer step runs (:meth:`AttentionMonitorLoop.step`) and when the step is over
(:meth:`AttentionMonitorLoop.log`); the engine decides what is captured and what is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from attnmonitor.checks import check_int
from attnmonitor.config import MonitorOptions, as_options
from attnmonitor.engine import MonitorEngine
from attnmonitor.tensorboard.publisher import WriterPublisher


class AttentionMonitorLoop:
    """Per-head attention statistics, figures and the attention regularizer in your own training loop.

    The same options, schedule, statistics and TensorBoard output as
    :class:`attnmonitor.AttentionMonitor`: training captures every ``every_n_steps`` optimizer steps
    (all micro-batches of that step), evaluation captures the first ``val_batches`` batches. Run each
    training micro-batch's forward inside ``with monitor.step(step, batch):`` and call
    ``monitor.log(writer)`` after each optimizer step (it costs nothing on steps that captured
    nothing). Under ``torch.distributed`` (DDP, Fabric) every process makes the same calls: the
    statistics are reduced exactly across processes, and only global rank zero writes.

    Args:
        model: the model, before it is wrapped for DDP or by ``fabric.setup`` (its module names are
            the layer names).
        options: a :class:`~attnmonitor.config.MonitorOptions` (or None); keyword arguments set or
            override its fields.
        device: device of the cross-process reduction; default: the device of the model's first
            parameter when the first statistics are published.

    Raises:
        ValueError: for an invalid option, or ``targets``/``layers`` options matching no module.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> with AttentionMonitorLoop(layer, schedule={"every_n_steps": 2}, dashboards={"heatmaps": None, "analyses": False}) as monitor:
        ...     for step in range(4):
        ...         with monitor.step(step):
        ...             loss = layer(torch.randn(3, 5, 8)).square().mean() + monitor.penalty()
        ...         loss.backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        ...         scalars = monitor.log()  # pass a SummaryWriter to write them
        ...         if scalars:
        ...             print(step, scalars["attn_train/entropy"] > 0)
        1 True
        3 True
    """

    def __init__(
        self, model: nn.Module, options: MonitorOptions | None = None, /, *, device: torch.device | str | None = None, **kwargs: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.options = as_options(options, kwargs)
        self.engine = MonitorEngine(self.options)
        self.model = model
        self.device = torch.device(device) if device is not None else None
        self.engine.attach(model)
        self._step: int | None = None  # optimizer step of the micro-batches run since the last log
        self.should_checkpoint = False
        """Whether an alarm with action ``"checkpoint"`` or ``"stop"`` fired at the last :meth:`log`: save one."""
        self.should_stop = False
        """Whether an alarm with action ``"stop"`` has fired: save, then end the loop."""
        self._writer: Any = None

    # training -----------------------------------------------------------------------------
    @contextmanager
    def step(self, step: int, batch: Any = None) -> Iterator[None]:
        """Run one training micro-batch of optimizer step ``step`` (counted from 0) inside this block.

        Args:
            step: the optimizer step; every micro-batch of one step passes the same number.
            batch: the micro-batch (a mapping with ``input_ids`` and the other batch keys of the
                options, or a tuple whose item 0 is the token ids); labels heatmaps, alignments.

        Raises:
            ValueError: if ``step`` is not an int >= 0.
        """
        check_int("step", step, 0)
        if self._step is not None and step != self._step:
            self._end_step(step, self._publisher())  # the previous step was not logged: publish it with the last writer
        self._step = step
        self.engine.start_train_batch(step, batch)
        try:
            yield
        finally:
            self.engine.end_train_batch(step, self._publisher())

    def penalty(self) -> Tensor:
        """The regularizer's penalty for this micro-batch's attention (0-dim tensor; 0 without a
        regularizer): add it to the loss inside :meth:`step`, after the forward.

        Each call returns the mean over the valid query rows of the attention computed since the
        last call; under gradient accumulation divide it like the task loss.
        """
        return self.engine.penalty.penalty()

    def log(self, writer: Any = None) -> dict[str, float]:
        """After the optimizer step: write the step's statistics when it was captured, and the
        regularizer's means (``attn_reg/*``) on capture steps; apply QK-clip; act on the alarms (warn,
        call the callables, and set :attr:`should_checkpoint` / :attr:`should_stop` for the loop to act on).

        Args:
            writer: a ``SummaryWriter`` (scalars, and on atlas/heatmap steps figures); None: nothing
                is written, the scalars are only returned.

        Returns:
            The scalars published now (``{}`` on other steps), by tag.
        """
        self._writer = writer
        if self._step is None:
            return {}
        publisher = self._publisher()
        self._end_step(self._step + 1, publisher)
        return publisher.scalars

    # evaluation ---------------------------------------------------------------------------
    @contextmanager
    def eval_batch(self, index: int, batch: Any = None) -> Iterator[None]:
        """Run evaluation batch ``index`` (0 for the first of each evaluation) inside this block;
        the first ``val_batches`` are captured.

        Raises:
            ValueError: if ``index`` is not an int >= 0.
        """
        check_int("index", index, 0)
        self.engine.start_eval_batch(index, batch)
        try:
            yield
        finally:
            self.engine.end_eval_batch()

    def log_eval(self, writer: Any = None, *, step: int) -> dict[str, float]:
        """After an evaluation: write its statistics and figures at ``step``; returns the scalars."""
        publisher = self._publisher(writer)
        self.engine.end_eval(step, publisher)
        return publisher.scalars

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state for your checkpoint (last published step, alarm history)."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: steps already published are not captured again."""
        self.engine.load_state_dict(state)

    # lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Publish a captured step not logged yet, wait for the figures, remove every hook (idempotent)."""
        if self.engine.capture is not None and self._step is not None:
            self._end_step(self._step + 1, self._publisher())
        self.engine.detach()

    def __enter__(self) -> AttentionMonitorLoop:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # helpers ------------------------------------------------------------------------------
    def _end_step(self, next_step: int, publisher: WriterPublisher) -> None:
        actions = self.engine.end_train_batch(next_step, publisher)
        self._step = None
        self.should_checkpoint = actions.checkpoint
        self.should_stop |= actions.stop

    def _publisher(self, writer: Any = None) -> WriterPublisher:
        if self.device is None:
            self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return WriterPublisher(writer if writer is not None else self._writer, self.device, self.options.schedule.every_n_steps)
