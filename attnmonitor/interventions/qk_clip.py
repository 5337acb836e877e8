"""QK-clip (Kimi K2, 2025): after an optimizer step, shrink the query and key projections of every head
whose largest attention logit exceeded ``tau``, so that its logits on the same inputs are at most ``tau``.

A head ``h`` whose ``max_logit`` ``m_h`` exceeds ``tau`` gets ``γ_h = tau / m_h``; its query rows
(weight and bias) and its key rows are multiplied by ``√γ_h``, so its logits ``scale · q·k`` (bilinear
in the projections) are multiplied by ``γ_h``. Heads at or under ``tau`` are not touched (bit for bit).

Grouped-query attention (several query heads share one key head): the shared key head takes the
strongest shrink of its group, ``√γ_min``, and each query head of the group ``γ_h / √γ_min``, so every
head's logits are still multiplied by exactly its own ``γ_h``. The query rows of an unclipped head in a
clipped group therefore change (by ``1/√γ_min``), its logits do not (up to rounding).

Only ``q·kᵀ`` scales: an additive bias (ALiBi, T5's relative buckets) or a soft-cap is not changed by
the projections, so on such models the bound holds for the ``q·kᵀ`` part only. Models that normalise
queries and keys after the projections (QK-norm) are refused: rescaling the projections would be undone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from attnmonitor.capture.discovery import innermost, is_attention_like, target_name
from attnmonitor.checks import layer_selected
from attnmonitor.config import QKClipConfig

SEPARATE = (("q_proj", "k_proj"), ("query", "key"), ("q_lin", "k_lin"), ("query_proj", "key_proj"), ("q", "k"))
"""Attribute names of separate query and key projections (Llama, BART, Whisper, CLIP, ...; BERT, ViT;
DistilBERT; DeBERTa; T5)."""
FUSED_THIRDS = ("c_attn", "qkv", "Wqkv")
"""Attribute names of one projection whose output is ``[queries | keys | values]`` in equal thirds
(GPT-2's ``Conv1D`` and nanoGPT; timm and the demo GPT; MPT and ModernBERT)."""
QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


@dataclass(frozen=True)
class Rows:
    """The entries of one parameter that hold a query (or key) projection of every head, head by head
    along ``dim`` (the output features: 0 for ``nn.Linear``'s ``[out, in]``, 1 for GPT-2's ``Conv1D``).

    The parameter is looked up on its module when used: sharding it later (FSDP2's ``fully_shard``,
    ``parallelize_module``, Lightning's ``configure_model`` after the monitor's ``setup``) replaces it.
    """

    owner: nn.Module
    name: str  # the parameter's attribute on ``owner``
    index: Tensor  # [heads · head_dim] long
    dim: int

    @property
    def param(self) -> Tensor:
        return getattr(self.owner, self.name)

    def scale(self, factors: Tensor) -> None:
        """Multiply head ``h``'s entries by ``factors[h]`` (``[heads]``); entries of heads with factor 1
        are multiplied by 1 (unchanged bit for bit), and nothing is written when every factor is 1.

        A sharded parameter (a DTensor: FSDP2, tensor parallel, both) scales the entries this process
        holds, each by its own head's factor, whatever the shards' layout (even, uneven, strided): the
        per-entry factors are laid out as the parameter is (no communication: every process holds the
        same synced factors).
        """
        if bool((factors == 1).all()):
            return
        param = self.param
        entry = torch.ones(param.shape[self.dim], dtype=factors.dtype)  # [entries along dim]
        entry[self.index.view(factors.numel(), -1)] = factors.cpu().unsqueeze(1)
        if isinstance(param, DTensor):
            placements = [_along(p, self.dim) for p in param.placements]
            entry = distribute_tensor(entry.to(param.device), param.device_mesh, placements, src_data_rank=None).to_local()
            param = param.to_local()
        shape = [1] * param.dim()
        shape[self.dim] = -1
        with torch.no_grad():
            param.mul_(entry.to(param.device, param.dtype).view(shape))


def _along(placement: Placement, dim: int) -> Placement:
    """The placement of a vector along a parameter's ``dim`` when the parameter is placed by ``placement``."""
    if isinstance(placement, (Shard, _StridedShard)) and placement.dim == dim:
        return _StridedShard(0, split_factor=placement.split_factor) if isinstance(placement, _StridedShard) else Shard(0)
    return Replicate()


@dataclass(frozen=True)
class Projections:
    """The query and key projections of one attention module (each: the parameters holding it)."""

    query: tuple[Rows, ...]
    key: tuple[Rows, ...]

    @property
    def widths(self) -> tuple[int, int]:
        """Output features of the query and of the key projection (``heads · head_dim``, ``kv_heads · head_dim``)."""
        return self.query[0].index.numel(), self.key[0].index.numel()


def _output_dim(module: nn.Module) -> int:
    """The dim of ``module.weight`` along its output features (transformers' ``Conv1D`` stores ``[in, out]``)."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def _linear_rows(module: nn.Module, index: Tensor | None = None) -> tuple[Rows, ...]:
    """Rows of ``module.weight`` (and bias) along its output features (all of them, or ``index``)."""
    weight, dim = module.weight, _output_dim(module)
    if index is None:
        index = torch.arange(weight.shape[dim])
    rows = [Rows(module, "weight", index, dim)]
    if isinstance(getattr(module, "bias", None), Tensor):
        rows.append(Rows(module, "bias", index, 0))
    return tuple(rows)


def _as_index(value: Any, width: int, where: str) -> Tensor:
    """A slice, range, ``[start, stop]`` pair or tensor of indices (the kinds :class:`QKClipConfig`
    accepts) as a long index within ``width``."""
    if isinstance(value, Tensor):
        index = value.long().flatten()
    elif isinstance(value, slice):
        index = torch.arange(width)[value]
    elif isinstance(value, range):
        index = torch.tensor(list(value), dtype=torch.long)
    else:
        index = torch.arange(value[0], value[1])
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= width:
        raise ValueError(f"{where} selects rows outside [0, {width}) or none: {value!r}")
    return index


def find_projections(name: str, module: nn.Module, mapping: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> Projections:
    """The query and key projections of the attention module ``name`` (``modules``: the model's, by
    qualified name, where ``mapping`` names its fused projections).

    Recognised: a user ``mapping`` entry ``{qualified name of a fused projection inside it: (query rows,
    key rows)}``; ``nn.MultiheadAttention``; separate projections (:data:`SEPARATE`); fused thirds
    (:data:`FUSED_THIRDS`).

    Raises:
        ValueError: naming the module, when none of those applies or it normalises queries and keys.
    """
    norms = [n for n in QK_NORMS if isinstance(getattr(module, n, None), nn.Module) and not isinstance(getattr(module, n), nn.Identity)]
    if norms:
        raise ValueError(
            f"qk_clip: attention module '{name}' ({type(module).__name__}) normalises queries and keys after the "
            f"projections ({norms}): rescaling the projections would be undone; exclude it with `qk_clip.layers`"
        )
    for fused_name, (q_rows, k_rows) in mapping.items():
        if fused_name == name or fused_name.startswith(f"{name}."):
            fused = modules[fused_name]
            width = fused.weight.shape[_output_dim(fused)]
            where = f"`qk_clip.projections['{fused_name}']`"
            return Projections(
                _linear_rows(fused, _as_index(q_rows, width, f"{where} query rows")),
                _linear_rows(fused, _as_index(k_rows, width, f"{where} key rows")),
            )
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        q, k = torch.arange(e), torch.arange(e, 2 * e)
        bias = () if module.in_proj_bias is None else ((Rows(module, "in_proj_bias", q, 0),), (Rows(module, "in_proj_bias", k, 0),))
        if module.in_proj_weight is not None:
            weights = (Rows(module, "in_proj_weight", q, 0),), (Rows(module, "in_proj_weight", k, 0),)
        else:
            weights = (Rows(module, "q_proj_weight", q, 0),), (Rows(module, "k_proj_weight", torch.arange(e), 0),)
        return Projections(weights[0] + (bias[0] if bias else ()), weights[1] + (bias[1] if bias else ()))
    for q_name, k_name in SEPARATE:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if _is_projection(q) and _is_projection(k):
            return Projections(_linear_rows(q), _linear_rows(k))
    for fused_name in FUSED_THIRDS:
        fused = getattr(module, fused_name, None)
        if _is_projection(fused) and not hasattr(module, "q_attn"):  # GPT-2 cross-attention: c_attn holds keys and values
            width = fused.weight.shape[_output_dim(fused)]
            if width % 3 == 0:
                third = width // 3
                return Projections(_linear_rows(fused, torch.arange(third)), _linear_rows(fused, torch.arange(third, 2 * third)))
    raise ValueError(
        f"qk_clip cannot tell the query and key projections of attention module '{name}' ({type(module).__name__}). "
        f"Recognised: nn.MultiheadAttention, separate {[p for pair in SEPARATE for p in pair]}, fused {list(FUSED_THIRDS)} "
        f"([q | k | v] in thirds). Name them with `qk_clip.projections` = {{'<fused module inside {name}>': "
        "[query rows, key rows]}} (each a [start, stop] pair, a slice or a tensor of row indices), or leave the module "
        "out with `qk_clip.layers`"
    )


def _is_projection(module: Any) -> bool:
    return isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2


def clip_factors(max_logit: Tensor, tau: float, kv_heads: int) -> tuple[Tensor, Tensor]:
    """Query factors ``[H]`` and key factors ``[kv_heads]`` from per-head maxima ``[H]`` (NaN: unseen).

    Query head ``h`` uses key head ``h // (H / kv_heads)`` (Hugging Face's ``repeat_kv``, SDPA's GQA).
    """
    gamma = torch.where(max_logit > tau, tau / max_logit, torch.ones_like(max_logit))  # NaN > tau is False
    key = gamma.view(kv_heads, -1).amin(1).sqrt()
    return gamma / key.repeat_interleave(gamma.numel() // kv_heads), key


class QKClip:
    """Rescales the query and key projections of the heads whose ``max_logit`` exceeded ``tau``.

    Args:
        config: :class:`~attnmonitor.config.QKClipConfig`.
        model: the model whose attention modules (``targets``: ``{qualified name: module}``) are clipped.

    Raises:
        ValueError: at construction, naming every selected attention module whose projections cannot
            be told (see :func:`find_projections`).
    """

    def __init__(self, config: QKClipConfig, model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
        if config.tau is None:
            raise ValueError("`qk_clip.tau` is None: QK-clip is off")
        self.tau = float(config.tau)
        self.layers = config.layers
        named = {target_name(name, m): m for name, m in targets.items()}  # as the capture names layers
        self._modules = {name: m for name, m in named.items() if layer_selected(name, config.layers)}
        self._projections: dict[str, Projections | None] = {}  # None: not recognised (warned once, not clipped)
        modules = dict(model.named_modules())
        errors = [
            f"`qk_clip.projections` names '{fused}', which is no module inside the attention modules clipped {sorted(self._modules)}"
            for fused in config.projections
            if fused not in modules or not any(fused.startswith(f"{name}.") for name in self._modules)
        ]
        for name, module in _innermost_attention(self._modules).items():
            try:
                self._projections[name] = find_projections(name, module, config.projections, modules)
            except ValueError as err:
                errors.append(str(err))
        if errors:
            raise ValueError("\n".join(errors))
        self._warned: set[str] = set()

    def apply(self, max_logit: Mapping[str, Tensor]) -> int:
        """Rescale after an optimizer step, from the step's ``{layer: [H]}`` maxima (NaN: a head not
        seen); a shared module's layers ``name#i`` take the smallest factor of its calls. Only this
        process's modules are rescaled (a pipeline stage holds some layers). Returns the number of
        heads above ``tau`` in every selected layer of ``max_logit``, wherever they are held."""
        by_module: dict[str, Tensor] = {}  # {module: [H]} of every selected layer, this process's or not
        for layer, values in max_logit.items():
            name = layer.split("#")[0]
            if layer_selected(name, self.layers) and values.numel():
                values = values.detach().float().cpu()
                seen = by_module.get(name)
                by_module[name] = values if seen is None else torch.fmax(seen, values)
        clipped = sum(int((values > self.tau).sum()) for values in by_module.values())
        for name, values in by_module.items():
            if name not in self._modules:  # another pipeline stage's
                continue
            projections = self._projections[name] if name in self._projections else self._late_projections(name)
            if projections is None:
                continue
            kv_heads = self._kv_heads(name, projections, values.numel())
            if kv_heads is None:
                continue
            query, key = clip_factors(values, self.tau, kv_heads)
            for rows in projections.query:
                rows.scale(query)
            for rows in projections.key:
                rows.scale(key)
        return clipped

    def _late_projections(self, name: str) -> Projections | None:
        """Projections of a target that turned out to compute attention while running (``targets="auto"``)."""
        try:
            self._projections[name] = find_projections(name, self._modules[name], {}, {})
        except ValueError as err:
            self._projections[name] = None
            self._warn(name, f"attnmonitor: {err}; this layer is not clipped.")
        return self._projections[name]

    def _kv_heads(self, name: str, projections: Projections, heads: int) -> int | None:
        q_width, k_width = projections.widths
        head_dim = q_width // heads if q_width % heads == 0 else 0
        kv_heads = k_width // head_dim if head_dim and k_width % head_dim == 0 else 0
        if not kv_heads or heads % kv_heads:
            self._warn(
                name,
                f"attnmonitor: qk_clip: layer '{name}' has {heads} heads but its query projection has {q_width} "
                f"outputs and its key projection {k_width}; this layer is not clipped.",
            )
            return None
        return kv_heads

    def _warn(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _innermost_attention(targets: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The targets that compute attention themselves: innermost, and attention-like (``"auto"`` also
    proposes softmax callers, decided while running; those are resolved when first clipped)."""
    return {name: m for name, m in innermost(dict(targets)).items() if is_attention_like(m)}
