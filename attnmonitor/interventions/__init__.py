"""Interventions on the model's weights between steps: QK-clip (:mod:`attnmonitor.interventions.qk_clip`)."""

from attnmonitor.interventions.qk_clip import QKClip, clip_factors

__all__ = ["QKClip", "clip_factors"]
