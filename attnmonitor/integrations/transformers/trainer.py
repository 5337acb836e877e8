"""The regularizer's penalty in the Hugging Face ``Trainer``'s loss: ``AttentionMonitorMixin`` and ``AttentionMonitorTrainer``.

A ``TrainerCallback`` cannot change the loss. The mixin overrides ``Trainer.compute_loss`` and adds
the penalty of the attention the forward just computed, scaled as the Trainer scales the task loss
for gradient accumulation, so that the gradient of a step is exactly that of
``task + λ · R``, ``R`` being the mean of the micro-batches' penalties (each a mean over its valid
query rows), and under DDP the mean over processes, as under Lightning.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from attnmonitor.integrations.transformers.callback import AttentionMonitorCallback


class AttentionMonitorMixin:
    """Mixin for a ``transformers.Trainer`` class: binds its :class:`AttentionMonitorCallback` and adds
    the monitor's regularizer penalty to the training loss.

    Put it before the Trainer class: ``class MyTrainer(AttentionMonitorMixin, Seq2SeqTrainer)``.
    The monitor is the ``AttentionMonitorCallback`` among ``callbacks`` (or added later with
    ``add_callback``); hooks are removed when ``train()`` ends, also on an exception.

    Raises:
        ValueError: if more than one ``AttentionMonitorCallback`` is given.
    """

    adds_attention_penalty = True
    """Tells :meth:`AttentionMonitorCallback.bind` that this Trainer adds the penalty to its loss."""
    attention_monitor: AttentionMonitorCallback | None = None
    """The bound monitor, or None."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bind_attention_monitor()

    def add_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        super().add_callback(callback)  # type: ignore[misc]
        self._bind_attention_monitor()

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Tensor | int | None = None
    ) -> Tensor | tuple[Tensor, Any]:
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        monitor = self.attention_monitor
        if monitor is None or not model.training or not monitor.engine.penalty.collecting:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = monitor.penalty().to(loss.device) * self._penalty_scale(num_items_in_batch)
        loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self.attention_monitor is not None:
                self.attention_monitor.close()

    def _penalty_scale(self, num_items_in_batch: Tensor | int | None) -> float:
        """1, or ``1 / accumulation steps`` when ``training_step`` does not divide the loss by them
        (a loss already normalised over the whole accumulated batch): the rule of ``Trainer.training_step``."""
        trainer: Any = self
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func is not None
        steps = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
        return 1.0 / steps if scaled else 1.0

    def _bind_attention_monitor(self) -> None:
        handler = getattr(self, "callback_handler", None)
        if handler is None:  # Trainer.__init__ adds callbacks before it is done
            return
        monitors = [cb for cb in handler.callbacks if isinstance(cb, AttentionMonitorCallback)]
        if len(monitors) > 1:
            raise ValueError(f"one AttentionMonitorCallback per Trainer, got {len(monitors)}")
        if monitors and monitors[0] is not self.attention_monitor:
            self.attention_monitor = monitors[0].bind(self)  # type: ignore[arg-type]


class AttentionMonitorTrainer(AttentionMonitorMixin, Trainer):
    """``transformers.Trainer`` with :class:`AttentionMonitorMixin`: pass an
    :class:`AttentionMonitorCallback` in ``callbacks``; its regularizer's penalty joins the loss.

    Example:
        >>> import tempfile, torch, transformers
        >>> config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8)
        >>> monitor = AttentionMonitorCallback(schedule={"every_n_steps": 1}, regularizer={"entropy_weight": 0.1})
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
        >>> data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 4
        >>> trainer = AttentionMonitorTrainer(
        ...     model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data, callbacks=[monitor]
        ... )
        >>> trainer.attention_monitor is monitor
        True
    """
