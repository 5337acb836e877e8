"""``AttentionRegularizer``: the penalty and the clipping, applied inside the attention calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from attnmonitor.capture.hooks import in_backward
from attnmonitor.checks import as_config, layer_selected
from attnmonitor.config import ClipConfig, RegularizerConfig
from attnmonitor.functional.regularization import clip_attention, entropy_penalty, sparsity_penalty


class AttentionRegularizer:
    """Adds attention penalties and clips attention weights of the layers it applies to.

    Used through :class:`attnmonitor.AttentionCapture` (``regularizer=``), which hands it each attention
    call's differentiable probabilities; the callback :class:`attnmonitor.AttentionMonitor` builds one
    from its ``regularizer`` and ``clip`` options and adds :meth:`penalty` to the training loss.

    Args:
        regularizer: :class:`RegularizerConfig` or a mapping of its fields; None for no penalty.
        clip: :class:`ClipConfig` or a mapping of its fields; None (or bounds ``[0, 1]``) for no clipping.

    Example:
        >>> from attnmonitor import AttentionCapture
        >>> layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
        >>> regularizer = AttentionRegularizer(regularizer={"entropy_weight": 0.1, "entropy_target": 0.3})
        >>> with AttentionCapture(layer, regularizer=regularizer) as cap:
        ...     cap.enabled = False  # regularize only, no statistics
        ...     loss = layer(torch.randn(3, 5, 8)).square().mean() + regularizer.penalty()
        >>> loss.backward()
    """

    def __init__(
        self,
        regularizer: RegularizerConfig | Mapping[str, Any] | None = None,
        clip: ClipConfig | Mapping[str, Any] | None = None,
    ) -> None:
        self.regularizer = as_config(regularizer, RegularizerConfig, "regularizer")
        clip_config = as_config(clip, ClipConfig, "clip")
        self.clip = clip_config if clip_config is not None and clip_config.enabled else None
        self.regularizing = self.regularizer is not None and self.regularizer.enabled
        """Whether penalties are collected now (the callback turns it on for training batches)."""
        self.scale = 1.0
        """Multiplier of the weights (the callback's warm-up)."""
        self.gradless_layers: set[str] = set()
        self._reset_terms()
        self._clipped = torch.zeros(2)  # weights at a bound, valid weights

    def begin_step(self, step: int) -> None:
        """A training step begins: collect penalty terms, with the weights ramped over ``warmup_steps``."""
        reg = self.regularizer
        if reg is not None and reg.enabled:
            self.regularizing = True
            self.scale = min(1.0, step / reg.warmup_steps) if reg.warmup_steps else 1.0

    @property
    def active(self) -> bool:
        return self.regularizing or self.clip is not None

    def applies(self, layer: str, training: bool) -> bool:
        return self._regularizes(layer, training) or self._clips(layer, training)

    def _regularizes(self, layer: str, training: bool) -> bool:
        reg = self.regularizer
        return self.regularizing and reg is not None and training and layer_selected(layer, reg.layers)

    def _clips(self, layer: str, training: bool) -> bool:
        clip = self.clip
        return clip is not None and (training or not clip.training_only) and layer_selected(layer, clip.layers)

    def apply(self, layer: str, probs: Tensor, key_valid: Tensor | None, query_valid: Tensor | None, training: bool = True) -> Tensor:
        """Collect this call's penalty terms (before clipping) and return the clipped probabilities."""
        if self._regularizes(layer, training):
            # a checkpointing recompute (inside backward) must repeat the same operations, and add nothing
            self._add_terms(layer, probs, key_valid, query_valid, keep=not in_backward())
        if self._clips(layer, training):
            assert self.clip is not None
            probs, at_bound = clip_attention(probs, key_valid, min=self.clip.min, max=self.clip.max)
            valid = torch.ones_like(probs, dtype=torch.bool) if key_valid is None else key_valid.expand_as(probs)
            self._clipped = self._clipped + torch.stack([at_bound.sum(), valid.sum()]).detach().float().cpu()
        return probs

    def _add_terms(self, layer: str, probs: Tensor, key_valid: Tensor | None, query_valid: Tensor | None, keep: bool = True) -> None:
        reg = self.regularizer
        assert reg is not None
        if not probs.requires_grad:  # reported by penalty(): never a silent zero
            self.gradless_layers.add(layer)
            return
        rows = key_valid.expand_as(probs).any(-1) if key_valid is not None else torch.ones_like(probs[..., 0], dtype=torch.bool)
        if query_valid is not None:
            rows = rows & query_valid.to(torch.bool)
        sums = dict(self._sums)
        if reg.entropy_weight > 0:
            per_row = entropy_penalty(probs, key_valid, target=reg.entropy_target, relative=reg.target_unit == "fraction")
            sums["entropy"] = sums["entropy"] + torch.where(rows, per_row, 0.0).sum()
        if reg.sparsity_weight > 0:
            per_row = sparsity_penalty(probs, key_valid)
            sums["sparsity"] = sums["sparsity"] + torch.where(rows, per_row, 0.0).sum()
        if keep:
            self._sums = sums
            self._counted_rows = self._counted_rows + rows.sum()

    def _reset_terms(self) -> None:
        self._sums: dict[str, Tensor | float] = {"entropy": 0.0, "sparsity": 0.0}
        self._counted_rows: Tensor | int = 0

    def penalty(self) -> Tensor:
        """``scale · (λ_H · R_H + λ_S · R_S)`` over every row regularized since the last call; resets.

        Each term is a mean over the valid query rows of all regularized layers and heads.
        :attr:`terms` keeps the unweighted terms for logging.

        Raises:
            RuntimeError: if the captured probabilities carried no gradient (reentrant activation
                checkpointing or a ``no_grad`` forward): the penalty could not change them.
        """
        reg = self.regularizer
        if self.gradless_layers:
            layers, self.gradless_layers = sorted(self.gradless_layers), set()
            self._reset_terms()
            raise RuntimeError(
                f"attnmonitor: the attention of {layers} carried no gradient when it was captured (reentrant "
                "activation checkpointing, or a forward under torch.no_grad), so a regularizer cannot change it. "
                "Use non-reentrant checkpointing (use_reentrant=False) or disable checkpointing for these layers."
            )
        rows = self._counted_rows
        self.terms = {name: s / rows if isinstance(s, Tensor) else None for name, s in self._sums.items()}
        total: Tensor | float = 0.0
        if reg is not None:
            for name, weight in (("entropy", reg.entropy_weight), ("sparsity", reg.sparsity_weight)):
                term = self.terms[name]
                if term is not None:
                    total = total + self.scale * weight * term
        self._reset_terms()
        return total if isinstance(total, Tensor) else torch.zeros(())

    @property
    def pending(self) -> bool:
        """Whether penalty terms were collected and :meth:`penalty` has not been called since."""
        return isinstance(self._counted_rows, Tensor) or self._counted_rows > 0

    def discard(self) -> None:
        """Drop collected penalty terms."""
        self._reset_terms()
        self.gradless_layers.clear()

    def clip_fraction(self) -> float | None:
        """Fraction of valid weights held at a bound since the last call (None: nothing clipped); resets."""
        hits, total = self._clipped.tolist()
        self._clipped = torch.zeros(2)
        return hits / total if total else None
