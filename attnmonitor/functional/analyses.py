"""Attention analyses of interpretability notebooks, vectorised over batch and heads, and corrected.

Shapes: ``probs [B, H, Lq, Lk]``, ``key_valid`` bool broadcastable to it, ``query_valid`` bool
broadcastable to ``[B, H, Lq]``. Per-row results are ``[B, H, Lq]``; per-head results ``[H]`` are
means over valid rows. Everything runs on the tensors' device in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnmonitor.functional.statistics import RowContext, mean_from_sums

FUNCTION_WORDS: frozenset[str] = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves""".split()
)
"""English function words (determiners, pronouns, prepositions, conjunctions, auxiliaries)."""

ROLES: tuple[str, ...] = ("self", "previous_token", "next_token", "sink", "local", "broad", "focused")
"""Head roles of :func:`head_roles`, in the order their rules are tried."""

ROLE_THRESHOLDS: dict[str, float] = {
    "self": 0.5,  # mean A_ii above this
    "previous_token": 0.5,  # mean A_{i,i-1} above this
    "next_token": 0.5,  # mean A_{i,i+1} above this
    "sink": 0.5,  # mean mass on the first sink_tokens keys above this
    "local": 0.7,  # locality (1 - normalised distance) above this
    "broad": 0.8,  # normalised entropy above this; anything else is "focused"
}
"""Documented thresholds of :func:`head_roles`, all on length-independent quantities."""


def _context(probs: Tensor, key_valid: Tensor | None, query_valid: Tensor | None) -> RowContext:
    return RowContext(probs, key_valid, query_valid)


def _head_mean(values: Tensor, valid: Tensor) -> Tensor:
    """``[B, H, Lq]`` values to ``[H]`` means over valid rows."""
    return mean_from_sums((values * valid).sum(dim=(0, 2)), valid.sum(dim=(0, 2)).to(values.dtype))


def top_k_attended(probs: Tensor, k: int = 5, key_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` most attended valid keys of every query: ``(weights, indices)``, each ``[..., Lq, k]``.

    Example:
        >>> weights, indices = top_k_attended(torch.tensor([[0.1, 0.6, 0.3]]), k=2)
        >>> weights, indices
        (tensor([[0.6000, 0.3000]]), tensor([[1, 2]]))
    """
    p = probs if key_valid is None else probs.masked_fill(~key_valid.expand_as(probs), -1.0)
    weights, indices = p.topk(min(k, probs.shape[-1]), dim=-1)
    return weights.clamp_min(0.0), indices


def similarity_attention_correlation(
    hidden: Tensor, probs: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None
) -> Tensor:
    """Pearson correlation, per head, between ``cos(x_i, x_j)`` and ``A_ij`` over valid (query, key) pairs.

    Args:
        hidden: ``[B, L, C]`` the attention module's input states (self-attention: ``Lq = Lk = L``).
        probs: ``[B, H, L, L]``.

    Returns:
        ``[H]`` correlations (0 where either side is constant).
    """
    unit = F.normalize(hidden.float(), dim=-1)
    similarity = (unit @ unit.transpose(-1, -2)).unsqueeze(1)  # [B, 1, L, L]
    ctx = _context(probs, key_valid, query_valid)
    pairs = (ctx.keys & ctx.valid.unsqueeze(-1)).float()  # [B, H, L, L]
    n = pairs.sum(dim=(0, 2, 3)).clamp_min(1)  # [H]

    def centred(x: Tensor) -> Tensor:
        mean = (x * pairs).sum(dim=(0, 2, 3)) / n
        return (x - mean.view(1, -1, 1, 1)) * pairs

    s, a = centred(similarity.expand_as(pairs)), centred(ctx.p)
    cov = (s * a).sum(dim=(0, 2, 3))
    scale = ((s * s).sum(dim=(0, 2, 3)) * (a * a).sum(dim=(0, 2, 3))).sqrt()
    return torch.where(scale > 0, cov / scale.clamp_min(1e-30), torch.zeros_like(cov))


def composition(probs: Tensor, values: Tensor, key_valid: Tensor | None = None) -> dict[str, Tensor]:
    """Norm-based composition of attention outputs (Kobayashi et al. 2020): ``c_ij = A_ij · ‖v_j‖``.

    The usual notebook formula takes the entropy of contribution ratios that do not sum to 1; here contributions are
    normalised per row first.

    Args:
        probs: ``[B, H, Lq, Lk]``.
        values: ``[B, H, Lk, Dv]`` value vectors (``Hkv`` heads are repeated for grouped-query attention).

    Returns:
        ``{"contributions": [B, H, Lq, Lk] normalised, "entropy": [B, H, Lq],
        "effective_contributors": [B, H, Lq] = exp(entropy)}``.
    """
    if values.shape[-3] != probs.shape[-3]:
        values = values.repeat_interleave(probs.shape[-3] // values.shape[-3], dim=-3)
    ctx = _context(probs, key_valid, None)
    raw = ctx.p * values.float().norm(dim=-1).unsqueeze(-2)  # [B, H, Lq, Lk]
    share = raw / raw.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = RowContext(share, ctx.keys).entropy
    return {"contributions": share, "entropy": entropy, "effective_contributors": entropy.exp() * (ctx.n > 0)}


def token_classes(tokens: Sequence[str], classes: dict[str, frozenset[str]] | None = None) -> Tensor:
    """Class id of every token: ``[L]`` long. Default classes: 0 content, 1 function word.

    With ``classes`` (name -> words), ids follow its order and unlisted tokens get ``len(classes)``.
    """
    if classes is None:
        return torch.tensor([int(t.lower().lstrip("#").lstrip("Ġ▁") in FUNCTION_WORDS) for t in tokens])
    names = list(classes)
    return torch.tensor([next((c for c, n in enumerate(names) if t in classes[n]), len(names)) for t in tokens])


def class_attention_share(
    probs: Tensor,
    classes: Tensor,
    num_classes: int,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
) -> Tensor:
    """Mean share of each row's attention received by each token class, per head: ``[H, num_classes]``.

    Args:
        classes: ``[B, Lk]`` (or ``[Lk]``) class id of every key.
    """
    ctx = _context(probs, key_valid, query_valid)
    onehot = F.one_hot(classes.long(), num_classes).float()  # [(B,) Lk, C]
    if onehot.dim() == 2:
        onehot = onehot.unsqueeze(0)
    share = ctx.p @ onehot.unsqueeze(1)  # [B, H, Lq, C]
    valid = ctx.valid.unsqueeze(-1).float()
    return (share * valid).sum(dim=(0, 2)) / valid.sum(dim=(0, 2)).clamp_min(1)


def positional_profile(
    probs: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None, window: int = 2
) -> dict[str, Tensor]:
    """Positional biases per head (``[H]`` each), with each row's own valid keys.

    ``first``: weight on the first valid key; ``last``: on the last valid key; ``middle``: the rest;
    ``spread``: standard deviation of the attended key position, divided by ``n_i``; ``locality``:
    mass within ``window`` positions of the query; ``normalized_distance``: mean ``|p_i − j|``
    divided by the largest distance possible for the row (0 when it has one key).
    """
    ctx = _context(probs, key_valid, query_valid)
    lk = probs.shape[-1]
    keys = torch.arange(lk, device=probs.device, dtype=torch.float32)
    first_index = torch.where(ctx.keys, keys, float(lk)).amin(-1)  # [B, H, Lq]
    last_index = torch.where(ctx.keys, keys, -1.0).amax(-1)
    first = ctx.p.gather(-1, first_index.clamp_max(lk - 1).long().unsqueeze(-1)).squeeze(-1)
    last = ctx.p.gather(-1, last_index.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    middle = torch.where(first_index < last_index, 1.0 - first - last, torch.zeros_like(first))
    mean_position = (ctx.p * keys).sum(-1)
    spread = ((ctx.p * (keys - mean_position.unsqueeze(-1)).square()).sum(-1)).sqrt() / ctx.n.clamp_min(1)
    gap = (ctx.positions.unsqueeze(-1).float() - keys).abs()  # [Lq, Lk]
    locality = (ctx.p * (gap <= window)).sum(-1)
    widest = torch.maximum((ctx.positions.float() - first_index).abs(), (last_index - ctx.positions.float()).abs())
    normalized_distance = torch.where(widest > 0, (ctx.p * gap).sum(-1) / widest.clamp_min(1), torch.zeros_like(widest))
    profile = {
        "first": first,
        "last": last,
        "middle": middle,
        "spread": spread,
        "locality": locality,
        "normalized_distance": normalized_distance,
    }
    return {name: _head_mean(value, ctx.valid) for name, value in profile.items()}


def head_roles(stats: dict[str, Tensor], thresholds: dict[str, float] | None = None) -> Tensor:
    """Classify every head from its mean statistics; ``[...]`` long indices into :data:`ROLES`.

    Rules, tried in order (thresholds in :data:`ROLE_THRESHOLDS`): ``self_weight``,
    ``prev_token_weight``, ``next_token_weight``, ``sink_mass`` above their thresholds give self,
    previous_token, next_token, sink; ``1 − normalized_distance`` above ``local`` gives local;
    ``normalized_entropy`` above ``broad`` gives broad; otherwise focused. All inputs are normalised
    quantities, so the rules do not depend on sequence length (an ``entropy > 3.0`` rule does).

    Args:
        stats: ``{name: [...]}`` with ``sink_mass`` and ``normalized_entropy``, and for self-attention
            ``self_weight``, ``prev_token_weight``, ``next_token_weight`` and ``normalized_distance``
            (absent for cross-attention: those roles are then never given).
    """
    t = {**ROLE_THRESHOLDS, **(thresholds or {})}
    never = torch.zeros_like(stats["sink_mass"], dtype=torch.bool)

    def above(name: str, threshold: float, flip: bool = False) -> Tensor:
        if name not in stats:
            return never
        return ((1 - stats[name]) if flip else stats[name]) > threshold

    rules = [  # in ROLES order
        above("self_weight", t["self"]),
        above("prev_token_weight", t["previous_token"]),
        above("next_token_weight", t["next_token"]),
        above("sink_mass", t["sink"]),
        above("normalized_distance", t["local"], flip=True),
        above("normalized_entropy", t["broad"]),
    ]
    role = torch.full_like(stats["sink_mass"], ROLES.index("focused"), dtype=torch.long)
    for index in reversed(range(len(rules))):  # earlier rules win
        role = torch.where(rules[index], index, role)
    return role


def attention_rollout(layers: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through layers, ``[B, T, T]``.

    ``Â_l = rownorm(mean_h A_l + I)`` and ``J_l = Â_l · J_{l−1}``; row ``i`` of the result says how
    much of token ``i``'s final representation flows from each input token. (A notebook's "outgoing"
    flow was always ``1/n``: attention rows sum to 1.)

    Args:
        layers: per layer, ``[B, H, T, T]`` probabilities, first layer first.
    """
    rollout: Tensor | None = None
    for probs in layers:
        a = probs.float().mean(1)  # [B, T, T]
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs at least one layer")
    return rollout


def diversity(probs: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None) -> Tensor:
    """Variance of the attention distributions across heads, averaged over keys and valid rows (a notebook's
    ``var(A, dim=heads).mean()``, restricted to valid rows and keys): ``[]``.
    """
    ctx = _context(probs, key_valid, query_valid)
    rows = ctx.valid.all(1)  # [B, Lq]: a row counts where every head has it
    keys = ctx.keys.all(1).float()  # [B, Lq, Lk]
    variance = ctx.p.var(dim=1, unbiased=False)  # [B, Lq, Lk]
    per_row = (variance * keys).sum(-1) / keys.sum(-1).clamp_min(1)
    return (per_row * rows).sum() / rows.sum().clamp_min(1)


def alignment_counts(probs: Tensor, alignments: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None) -> Tensor:
    """``[correct, counted]``: rows whose head-mean argmax ``argmax_j mean_h A_hij`` is the true key.

    Args:
        probs: ``[B, H, Lq, Lk]``; key_valid, query_valid: as :func:`row_statistics`.
        alignments: ``[B, Lq]`` true key of each row; negative entries mark rows without one.

    Example:
        >>> probs = torch.tensor([[[[0.9, 0.1], [0.8, 0.2]]]])  # both rows look at key 0
        >>> alignment_counts(probs, torch.tensor([[0, 1]]))
        tensor([1., 2.])
    """
    ctx = _context(probs, key_valid, query_valid)
    predicted = ctx.p.mean(1).argmax(-1)  # [B, Lq]
    truth = alignments.to(predicted.device).long()
    counted = (truth >= 0) & ctx.valid.any(1)
    return torch.stack([((predicted == truth) & counted).sum(), counted.sum()]).float()


def alignment_accuracy(probs: Tensor, alignments: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None) -> Tensor:
    """Fraction of rows whose head-mean argmax is the true key (see :func:`alignment_counts`): ``[]``."""
    correct, counted = alignment_counts(probs, alignments, key_valid, query_valid)
    return correct / counted.clamp_min(1)
