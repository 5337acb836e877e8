"""The attention monitor for the Hugging Face ``Trainer`` (needs ``transformers`` and ``accelerate``).

- :class:`AttentionMonitorCallback`: the ``TrainerCallback`` (capture schedule, statistics, logging).
- :class:`AttentionMonitorTrainer` / :class:`AttentionMonitorMixin`: a Trainer that binds it and adds
  the regularizer's penalty to the loss.
"""

from attnmonitor.integrations.transformers.callback import AttentionMonitorCallback
from attnmonitor.integrations.transformers.publisher import EVAL_PREFIX, TrainerPublisher
from attnmonitor.integrations.transformers.trainer import AttentionMonitorMixin, AttentionMonitorTrainer

__all__ = ["EVAL_PREFIX", "AttentionMonitorCallback", "AttentionMonitorMixin", "AttentionMonitorTrainer", "TrainerPublisher"]
