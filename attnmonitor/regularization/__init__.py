"""Regularizing attention: penalties added to the loss and exact clipping of attention weights.

How the penalty enters each training loop's loss is the adapters' (:mod:`attnmonitor.integrations`);
this package does not import Lightning.
"""

from attnmonitor.config import ClipConfig, RegularizerConfig
from attnmonitor.regularization.regularizer import AttentionRegularizer

__all__ = ["AttentionRegularizer", "ClipConfig", "RegularizerConfig"]
