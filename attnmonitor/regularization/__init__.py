"""Regularizing attention: penalties added to the loss and exact clipping of attention weights.

The Lightning integration (:mod:`attnmonitor.regularization.lightning`) is imported on its own, so
that this package does not import Lightning.
"""

from attnmonitor.config import ClipConfig, RegularizerConfig
from attnmonitor.regularization.regularizer import AttentionRegularizer

__all__ = ["AttentionRegularizer", "ClipConfig", "RegularizerConfig"]
