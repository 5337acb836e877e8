"""The monitor in training loops other than Lightning, each a thin adapter over :class:`attnmonitor.engine.MonitorEngine`.

- :mod:`attnmonitor.integrations.transformers`: Hugging Face ``Trainer`` (``AttentionMonitorCallback``,
  ``AttentionMonitorTrainer``, ``AttentionMonitorMixin``); needs ``transformers`` and ``accelerate``.
- :mod:`attnmonitor.integrations.loop`: a hand-written PyTorch loop or Lightning Fabric (``AttentionMonitorLoop``).

Both take the options of :class:`attnmonitor.config.MonitorOptions`, as the Lightning callback does.
"""
