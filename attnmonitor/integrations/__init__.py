"""The training-loop adapters of :class:`attnmonitor.engine.MonitorEngine`: each translates its loop's
events into engine calls, and the :class:`~attnmonitor.alarms.Actions` it returns into its framework's terms.

- :mod:`attnmonitor.integrations.lightning`: the Lightning callback (``AttentionMonitor``, also
  ``attnmonitor.AttentionMonitor``) and its progress bar.
- :mod:`attnmonitor.integrations.transformers`: Hugging Face ``Trainer`` (``AttentionMonitorCallback``,
  ``AttentionMonitorTrainer``, ``AttentionMonitorMixin``); needs ``transformers`` and ``accelerate``.
- :mod:`attnmonitor.integrations.loop`: a hand-written PyTorch loop or Lightning Fabric (``AttentionMonitorLoop``).

All take the options of :class:`attnmonitor.config.MonitorOptions`.
"""
