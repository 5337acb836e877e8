"""Hugging Face model families for ``test_hf_families.py``, and an independent float64 reference.

Written without any attnmonitor code. Each :class:`Family` knows how to build a tiny randomly
initialised model, which qualified module names compute its attention (in forward order) and how
each attention layer masks its keys. The reference takes the probabilities the EAGER model returns
with ``output_attentions=True`` and the masks this file builds from the inputs, checks that the two
agree (valid keys > 0, invalid keys exactly 0, rows summing to 1), and computes every statistic in
float64:

per valid query row ``i`` with probabilities ``A`` over its valid keys ``K_i`` (``n_i`` of them)::

    entropy             H = -sum_j A_ij log A_ij
    normalized_entropy  H / log n_i            (0 when n_i == 1)
    max_weight          max_j A_ij
    sparsity            |{j : A_ij < 0.1 / n_i}| / n_i
    effective_support   exp(H)
    sink_mass           A_is, s = first real token of the row's own sequence (or packed document)
    self-attention only, with p_i = i + Lk - Lq the query's position among the keys:
    distance            sum_j A_ij |p_i - j|
    self_weight / prev_token_weight / next_token_weight     A_{i,p_i} / A_{i,p_i-1} / A_{i,p_i+1}

then averaged per head over the valid rows of the whole batch.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from tests.helpers.reference import NAMES

ALL_STATISTICS = NAMES
POSITIONAL = ("distance", "self_weight", "prev_token_weight", "next_token_weight")
"""Statistics that only exist for self-attention (the query has a position among the keys)."""
CROSS_STATISTICS = tuple(s for s in ALL_STATISTICS if s not in POSITIONAL)

SPARSITY_EPS = 0.1
SPARSITY_MARGIN = 1e-4
"""No valid weight may lie within this relative distance of ``0.1 / n_i``: the sparsity count of the
reference must not hinge on float32 noise between the eager and the SDPA computation."""

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 100, 32, 4, 2, 37
INIT_STD = 0.2
"""Weights are redrawn with this std so that heads are far from uniform (HF's default 0.02 gives
almost uniform attention, where most statistics cannot tell a right mask from a wrong one)."""
SEQ_LEN = 8
LENGTHS = (8, 5, 1, 7)
"""Real tokens per row of the text batches: one full row, one heavily padded row (a single token)."""
WINDOW = 3
"""Sliding window of Mistral and Qwen2 (shorter than ``SEQ_LEN``)."""
MODERNBERT_LOCAL = 4
"""ModernBERT's ``local_attention`` (total window): its sliding layers see keys with |q - k| <= 2."""

# ------------------------------------------------------------------------------------------------
# masks


Window = Callable[[Tensor, Tensor], Tensor]
"""``(query_positions [Lq, 1], key_positions [1, Lk]) -> bool [Lq, Lk]``: keys inside the window."""


def causal_window(size: int) -> Window:
    """Mistral/Qwen2 (``masking_utils.sliding_window_overlay``): the ``size`` most recent keys, self included."""
    return lambda q, k: q - k < size


def bidirectional_window(half: int) -> Window:
    """ModernBERT's local layers: keys at distance ``<= half`` on either side."""
    return lambda q, k: (q - k).abs() <= half


@dataclass
class RefLayer:
    """One captured attention call as the reference sees it."""

    name: str
    kind: str  # "self" | "cross"
    probs: Tensor  # [B, H, Lq, Lk] from the eager model
    key_valid: Tensor  # bool [B, Lq, Lk]
    query_valid: Tensor  # bool [B, Lq]
    sink: Tensor  # long [B, Lq]: key index of each row's first real token (its sequence's/document's)


def self_attention_masks(
    key_real: Tensor,
    lq: int,
    causal: bool,
    window: Window | None = None,
    documents: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``key_valid [B, Lq, Lk]``, ``query_valid [B, Lq]`` and ``sink [B, Lq]`` of a self-attention.

    ``key_real [B, Lk]``: real (non-pad) tokens of the key sequence, the queries being its last ``lq``
    tokens (bottom-right: ``Lk - Lq`` cached tokens before them). ``documents [B, Lk]``: id of the
    packed document of each token; keys of another document are invalid.
    """
    b, lk = key_real.shape
    key_real = key_real.bool()
    q_pos = torch.arange(lq) + (lk - lq)
    k_pos = torch.arange(lk)
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= window(q_pos[:, None], k_pos[None, :])
    same_doc = torch.ones(b, lq, lk, dtype=torch.bool)
    if documents is not None:
        same_doc = documents[:, q_pos, None] == documents[:, None, :]
    key_valid = key_real[:, None, :] & allowed[None] & same_doc
    query_valid = key_real[:, q_pos] & key_valid.any(-1)
    # first real key of the row's own sequence/document, whether the row can see it or not
    candidates = key_real[:, None, :] & same_doc  # [B, Lq, Lk]
    sink = torch.where(candidates, k_pos, lk).min(-1).values
    return key_valid, query_valid, sink


def cross_attention_masks(decoder_real: Tensor, encoder_real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Masks of a cross-attention: keys are the real encoder tokens, rows the real decoder tokens."""
    b, lq = decoder_real.shape
    lk = encoder_real.shape[1]
    key_valid = encoder_real.bool()[:, None, :].expand(b, lq, lk).clone()
    query_valid = decoder_real.bool() & key_valid.any(-1)
    sink = torch.where(encoder_real.bool(), torch.arange(lk), lk).min(-1).values[:, None].expand(b, lq).clone()
    return key_valid, query_valid, sink


# ------------------------------------------------------------------------------------------------
# statistics


def statistic_sums(layer: RefLayer) -> tuple[dict[str, Tensor], int]:
    """Per-head float64 sums ``{statistic: [H]}`` over the valid rows of ``layer``, and their number."""
    p = layer.probs.double()
    b, h, lq, lk = p.shape
    kv = layer.key_valid[:, None]  # [B, 1, Lq, Lk]
    p = torch.where(kv, p, 0.0)
    n = layer.key_valid.sum(-1).double()[:, None].expand(b, h, lq)  # [B, H, Lq]
    rows = layer.query_valid[:, None].expand(b, h, lq)
    n_safe = n.clamp(min=1)
    entropy = -torch.where(p > 0, p * p.clamp(min=1e-300).log(), 0.0).sum(-1)
    values = {
        "entropy": entropy,
        "normalized_entropy": torch.where(n > 1, entropy / n_safe.log().clamp(min=1e-300), 0.0),
        "max_weight": p.max(-1).values,
        "sparsity": ((p < SPARSITY_EPS / n_safe[..., None]) & kv).sum(-1).double() / n_safe,
        "effective_support": entropy.exp(),
        "sink_mass": _gather_keys(p, layer.sink[:, None].expand(b, h, lq)),
    }
    if layer.kind == "self":
        pos = torch.arange(lq) + (lk - lq)  # p_i, bottom-right aligned
        values["distance"] = (p * (pos[:, None] - torch.arange(lk)[None, :]).abs().double()).sum(-1)
        for statistic, offset in (("self_weight", 0), ("prev_token_weight", -1), ("next_token_weight", 1)):
            values[statistic] = _gather_keys(p, (pos + offset).expand(b, h, lq))
    sums = {name: torch.where(rows, v, 0.0).sum((0, 2)) for name, v in values.items()}
    return sums, int(layer.query_valid.sum())


def _gather_keys(p: Tensor, index: Tensor) -> Tensor:
    """``p[b, h, i, index[b, h, i]]``, 0 where the index is outside ``[0, Lk)``."""
    lk = p.shape[-1]
    inside = (index >= 0) & (index < lk)
    got = p.gather(-1, index.clamp(0, lk - 1)[..., None])[..., 0]
    return torch.where(inside, got, 0.0)


def means(sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """Per-head means from :func:`statistic_sums` output."""
    assert count > 0, "no valid query row: the case tests nothing"
    return {name: s / count for name, s in sums.items()}


def reference_stats(layers: Iterable[RefLayer]) -> dict[str, dict[str, Tensor]]:
    """``{layer: {statistic: [H]}}`` after :func:`check_masks` on every layer."""
    out = {}
    for layer in layers:
        check_masks(layer)
        out[layer.name] = means(*statistic_sums(layer))
    return out


def check_masks(layer: RefLayer) -> None:
    """SELF-CHECK: the reference masks are those the eager model applied.

    On every valid row the eager probabilities are > 0 on valid keys, < 1e-30 on invalid keys and sum
    to 1; and no valid weight is within :data:`SPARSITY_MARGIN` of the sparsity threshold.
    """
    p = layer.probs.double()
    b, h, lq, lk = p.shape
    assert layer.key_valid.shape == (b, lq, lk), (layer.name, layer.key_valid.shape, p.shape)
    assert layer.query_valid.shape == (b, lq), (layer.name, layer.query_valid.shape)
    assert layer.query_valid.any(), f"{layer.name}: no valid query row"
    rows = layer.query_valid[:, None, :, None].expand_as(p)
    on = rows & layer.key_valid[:, None].expand_as(p)
    off = rows & ~layer.key_valid[:, None].expand_as(p)
    assert bool((p[on] > 0).all()), f"{layer.name}: the reference calls a key valid that the model masked (min {p[on].min():.3g})"
    assert bool((p[off] < 1e-30).all()), f"{layer.name}: the reference masks a key the model attends (max {p[off].max():.3g})"
    row_sums = p.sum(-1)[layer.query_valid[:, None].expand(b, h, lq)]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), rtol=0, atol=1e-5, msg=f"{layer.name}: rows do not sum to 1")
    n = layer.key_valid.sum(-1)[:, None, :, None].expand_as(p).double()
    ratio = p[on] / (SPARSITY_EPS / n[on])
    assert bool(((ratio - 1).abs() > SPARSITY_MARGIN).all()), f"{layer.name}: a weight sits on the sparsity threshold; change the seed"


# ------------------------------------------------------------------------------------------------
# families


@dataclass(frozen=True)
class Family:
    """A tiny Hugging Face model, its attention layer names and masking.

    ``arch``:
      - ``"encoder"``: bidirectional self-attention over ``attention_mask`` (``names["self"]``);
      - ``"decoder"``: causal self-attention over ``attention_mask`` (``names["self"]``);
      - ``"seq2seq"``: ``names["enc"]`` layers, then per decoder layer ``names["dec"]`` (causal, over
        ``decoder_attention_mask``) and ``names["cross"]`` (keys: encoder ``attention_mask``);
      - ``"speech"``: Whisper: as seq2seq with an unpadded encoder fed ``input_features``;
      - ``"vision"``: bidirectional self-attention, every patch valid;
      - ``"clip"``: ``names["vision"]`` layers, then ``names["text"]`` layers (causal, text padding).
    """

    name: str
    model: str  # transformers class name
    config: Callable[[], Any] = field(repr=False)
    arch: str
    names: dict[str, str] = field(repr=False)
    unsupported: dict[str, str] = field(default_factory=dict)  # implementation -> reason
    windows: Callable[[int], Window | None] = field(default=lambda layer: None, repr=False)
    shared_layer: bool = False  # ALBERT: one module called num_hidden_layers times ("name#k")
    sdpa_reference: Callable[[nn.Module], list[Any]] | None = field(default=None, repr=False)
    """Test-side hooks on the EAGER model (returning their handles) that make it compute what the SDPA
    implementation computes, where this transformers' eager path differs from its SDPA path."""

    def build(self, impl: str, state: dict[str, Tensor] | None = None) -> nn.Module:
        """The model in eval mode; random weights (std :data:`INIT_STD`) unless ``state`` is given."""
        torch.manual_seed(0)
        model = getattr(transformers, self.model)._from_config(self.config(), attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        if state is None:
            randomize(model)
        else:
            model.load_state_dict(state)
        return model


def randomize(model: nn.Module, std: float = INIT_STD, seed: int = 0) -> None:
    """Redraw every matrix-shaped parameter (projections, embeddings, convolutions) from N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _single_alibi(model: nn.Module) -> list[Any]:
    """Falcon (alibi=True): make the eager model add ALiBi once, as its SDPA path does, if it does not already.

    transformers up to 5.24 adds ALiBi twice on Falcon's eager path (once inside ``FalconAttention``
    from its ``alibi`` argument, once in the alibi-fused causal mask ``FalconModel`` builds) but once on
    the SDPA path (the fused mask only): eager and SDPA outputs differ by ~0.08. From 5.25 on, ALiBi is
    in the fused mask alone and the attention (no ``alibi`` argument) goes through the shared eager/SDPA
    interface: both paths add it once.

    Told by behaviour, not by version or signature: an SDPA twin with the same weights is run on a padded
    probe batch. If the eager model already matches it, no hook is needed. Otherwise a pre-hook on every
    ``self_attention`` module zeroes the ALiBi it receives (keyword or positional), which leaves the fused
    mask alone, and the eager model must then match the twin; if it still does not, this transformers
    computes Falcon's eager and SDPA paths differently in some new way and the reference says so."""
    twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="sdpa").eval()
    twin.load_state_dict(model.state_dict())
    probe = dict(input_ids=token_ids((len(LENGTHS), SEQ_LEN), seed=4), attention_mask=padding_mask(LENGTHS, SEQ_LEN), use_cache=False)
    real = probe["attention_mask"].bool()

    def gap() -> float:
        with torch.no_grad():
            got, want = model(**probe).last_hidden_state, twin(**probe).last_hidden_state
        return float((got - want)[real].abs().max())

    if gap() <= _ALIBI_TOL:
        return []
    modules = [m for n, m in model.named_modules() if n.endswith("self_attention")]
    position = {m: _parameter_index(m.forward, "alibi") for m in modules}

    def zero_alibi(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(kwargs.get("alibi"), Tensor):
            kwargs = {**kwargs, "alibi": torch.zeros_like(kwargs["alibi"])}
        index = position[module]
        if index is not None and index < len(args) and isinstance(args[index], Tensor):
            args = (*args[:index], torch.zeros_like(args[index]), *args[index + 1 :])
        return args, kwargs

    handles = [m.register_forward_pre_hook(zero_alibi, with_kwargs=True) for m in modules]
    remaining = gap()
    if remaining > _ALIBI_TOL:
        for handle in handles:
            handle.remove()
        raise AssertionError(
            f"harness: Falcon-ALiBi eager and SDPA differ by {remaining:.3g} in transformers {transformers.__version__} even with the "
            "attention's own ALiBi zeroed; the reference cannot reproduce the SDPA computation"
        )
    return handles


_ALIBI_TOL = 1e-5
"""Largest eager/SDPA output gap (float32, the tiny model) taken as the same computation: a double
ALiBi gives ~0.08, float32 noise ~1e-6."""


def _parameter_index(function: Callable[..., Any], name: str) -> int | None:
    """Position of ``name`` among the positional parameters of a bound ``function``, if it has one."""
    parameters = list(inspect.signature(function).parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


def _text(cls: str, **kwargs: Any) -> Callable[[], Any]:
    """A config factory; token ids kept inside the tiny vocabulary."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return lambda: getattr(transformers, cls)(**{**ids, **kwargs})


_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN)
_LLAMALIKE = dict(_BERTLIKE, num_key_value_heads=2, max_position_embeddings=32)
_BARTLIKE = dict(
    vocab_size=VOCAB,
    d_model=HIDDEN,
    encoder_layers=LAYERS,
    decoder_layers=LAYERS,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=FFN,
    decoder_ffn_dim=FFN,
    max_position_embeddings=32,
    decoder_start_token_id=1,
    forced_eos_token_id=None,
)
_BART_NAMES = dict(enc="encoder.layers.{i}.self_attn", dec="decoder.layers.{i}.self_attn", cross="decoder.layers.{i}.encoder_attn")
_NO_SDPA = "no SDPA implementation in this transformers (_supports_sdpa = False)"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        # encoder-only -------------------------------------------------------------------------
        Family("bert", "BertModel", _text("BertConfig", **_BERTLIKE), "encoder", dict(self="encoder.layer.{i}.attention.self")),
        Family("roberta", "RobertaModel", _text("RobertaConfig", **_BERTLIKE), "encoder", dict(self="encoder.layer.{i}.attention.self")),
        Family(
            "distilbert",
            "DistilBertModel",
            _text("DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN),
            "encoder",
            dict(self="transformer.layer.{i}.attention"),
        ),
        Family(
            "albert",
            "AlbertModel",
            _text("AlbertConfig", **_BERTLIKE, embedding_size=16),
            "encoder",
            dict(self="encoder.albert_layer_groups.0.albert_layers.0.attention"),
            shared_layer=True,
        ),
        Family(
            "electra",
            "ElectraModel",
            _text("ElectraConfig", **_BERTLIKE, embedding_size=16),
            "encoder",
            dict(self="encoder.layer.{i}.attention.self"),
        ),
        Family(
            "deberta-v2",
            "DebertaV2Model",
            _text(
                "DebertaV2Config",
                **_BERTLIKE,
                relative_attention=True,
                position_buckets=4,
                max_relative_positions=8,
                pos_att_type=["p2c", "c2p"],
            ),
            "encoder",
            dict(self="encoder.layer.{i}.attention.self"),
            unsupported={"sdpa": _NO_SDPA},
        ),
        Family(
            "modernbert",
            "ModernBertModel",
            _text(
                "ModernBertConfig",
                **_BERTLIKE,
                local_attention=MODERNBERT_LOCAL,
                global_attn_every_n_layers=2,
                cls_token_id=1,
                sep_token_id=2,
                max_position_embeddings=32,
            ),
            "encoder",
            dict(self="layers.{i}.attn"),
            # layer 0 global, layer 1 local: |q - k| <= local_attention // 2 (create_bidirectional_sliding_window_mask)
            windows=lambda i: None if i % 2 == 0 else bidirectional_window(MODERNBERT_LOCAL // 2),
        ),
        # decoder-only -------------------------------------------------------------------------
        Family(
            "gpt2",
            "GPT2Model",
            _text("GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32),
            "decoder",
            dict(self="h.{i}.attn"),
        ),
        Family(
            "gptj",
            "GPTJModel",
            _text("GPTJConfig", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_positions=32),
            "decoder",
            dict(self="h.{i}.attn"),
        ),
        Family(
            "gpt-neox",
            "GPTNeoXModel",
            _text("GPTNeoXConfig", **_BERTLIKE, max_position_embeddings=32),
            "decoder",
            dict(self="layers.{i}.attention"),
        ),
        Family(
            "opt",
            "OPTModel",
            _text(
                "OPTConfig", **{**_BERTLIKE, "intermediate_size": None}, ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=32
            ),
            "decoder",
            dict(self="decoder.layers.{i}.self_attn"),
        ),
        Family("llama-gqa", "LlamaModel", _text("LlamaConfig", **_LLAMALIKE), "decoder", dict(self="layers.{i}.self_attn")),
        Family(
            "mistral-window",
            "MistralModel",
            _text("MistralConfig", **_LLAMALIKE, sliding_window=WINDOW),
            "decoder",
            dict(self="layers.{i}.self_attn"),
            windows=lambda i: causal_window(WINDOW),
        ),
        Family(
            "qwen2-window",
            "Qwen2Model",
            _text("Qwen2Config", **_LLAMALIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
            "decoder",
            dict(self="layers.{i}.self_attn"),
            windows=lambda i: causal_window(WINDOW) if i >= 1 else None,  # layers >= max_window_layers slide
        ),
        Family(
            "gemma",
            "GemmaModel",
            _text("GemmaConfig", **{**_LLAMALIKE, "num_key_value_heads": 1}, head_dim=8),
            "decoder",
            dict(self="layers.{i}.self_attn"),
        ),
        Family(
            "phi",
            "PhiModel",
            _text("PhiConfig", **_BERTLIKE, max_position_embeddings=32),
            "decoder",
            dict(self="layers.{i}.self_attn"),
        ),
        Family(
            "bloom",
            "BloomModel",
            _text("BloomConfig", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
            "decoder",
            dict(self="h.{i}.self_attention"),
            unsupported={"sdpa": _NO_SDPA},
        ),
        Family(
            "falcon-alibi",
            "FalconModel",
            _text("FalconConfig", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, alibi=True),
            "decoder",
            dict(self="h.{i}.self_attention"),
            sdpa_reference=lambda model: _single_alibi(model),
        ),
        Family(
            "mpt",
            "MptModel",
            _text("MptConfig", vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=32),
            "decoder",
            dict(self="blocks.{i}.attn"),
            unsupported={"sdpa": _NO_SDPA},
        ),
        # encoder-decoder ----------------------------------------------------------------------
        Family(
            "t5",
            "T5Model",
            _text(
                "T5Config",
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=8,
                d_ff=FFN,
                num_layers=LAYERS,
                num_heads=HEADS,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                decoder_start_token_id=0,
            ),
            "seq2seq",
            dict(
                enc="encoder.block.{i}.layer.0.SelfAttention",
                dec="decoder.block.{i}.layer.0.SelfAttention",
                cross="decoder.block.{i}.layer.1.EncDecAttention",
            ),
        ),
        Family("bart", "BartModel", _text("BartConfig", **_BARTLIKE), "seq2seq", _BART_NAMES),
        Family("mbart", "MBartModel", _text("MBartConfig", **_BARTLIKE), "seq2seq", _BART_NAMES),
        Family(
            "whisper",
            "WhisperModel",
            _text(
                "WhisperConfig",
                **{k: v for k, v in _BARTLIKE.items() if k != "max_position_embeddings"},
                num_mel_bins=8,
                max_source_positions=SEQ_LEN,
                max_target_positions=32,
                suppress_tokens=[],
                begin_suppress_tokens=[],
            ),
            "speech",
            _BART_NAMES,
        ),
        # vision / dual tower ------------------------------------------------------------------
        Family(
            "vit",
            "ViTModel",
            lambda: transformers.ViTConfig(
                hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, image_size=8, patch_size=4
            ),
            "vision",
            dict(self="layers.{i}.attention"),
        ),
        Family(
            "clip",
            "CLIPModel",
            lambda: transformers.CLIPConfig(
                text_config=dict(_BERTLIKE, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                vision_config=dict(
                    hidden_size=HIDDEN,
                    num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS,
                    intermediate_size=FFN,
                    image_size=12,
                    patch_size=4,
                ),
                projection_dim=16,
            ),
            "clip",
            dict(vision="vision_model.encoder.layers.{i}.self_attn", text="text_model.encoder.layers.{i}.self_attn"),
        ),
    ]
}
DECODERS = [name for name, f in FAMILIES.items() if f.arch == "decoder"]
SEQ2SEQ = [name for name, f in FAMILIES.items() if f.arch in ("seq2seq", "speech")]
CLIP_PATCHES = (12 // 4) ** 2
"""Vision patches of the CLIP config: its text batches have ``CLIP_PATCHES + 1`` tokens, as its vision tower."""

# ------------------------------------------------------------------------------------------------
# inputs


def padding_mask(lengths: Iterable[int], seq_len: int, left: bool = False) -> Tensor:
    """``[B, seq_len]`` long mask with ``lengths[b]`` real tokens, right (default) or left aligned."""
    rows = [[0] * (seq_len - n) + [1] * n if left else [1] * n + [0] * (seq_len - n) for n in lengths]
    return torch.tensor(rows, dtype=torch.long)


def token_ids(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Random ids in ``[3, VOCAB)`` (clear of the pad/bos/eos ids)."""
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def family_inputs(
    family: Family,
    *,
    left: bool = False,
    decoder_len: int = SEQ_LEN,
    decoder_lengths: tuple[int, ...] | None = None,
) -> dict[str, Tensor]:
    """Model inputs of one batch of 4 for ``family`` (padded with :data:`LENGTHS`)."""
    b = len(LENGTHS)
    gen = torch.Generator().manual_seed(1)
    if family.arch == "vision":
        return dict(pixel_values=torch.randn(b, 3, 8, 8, generator=gen))
    if family.arch == "clip":
        lq = CLIP_PATCHES + 1  # the shape coincidence: text rows == vision rows
        lengths = (lq, 4, 1, lq - 1)
        pixels = torch.randn(b, 3, 12, 12, generator=gen)
        return dict(input_ids=token_ids((b, lq)), attention_mask=padding_mask(lengths, lq), pixel_values=pixels)
    inputs: dict[str, Tensor] = {}
    if family.arch in ("encoder", "decoder", "seq2seq"):
        inputs.update(input_ids=token_ids((b, SEQ_LEN)), attention_mask=padding_mask(LENGTHS, SEQ_LEN, left=left))
    if family.arch == "speech":
        inputs["input_features"] = torch.randn(b, 8, 2 * SEQ_LEN, generator=gen)  # conv stride 2: SEQ_LEN frames
    if family.arch in ("seq2seq", "speech"):
        lengths = decoder_lengths or tuple(min(n, decoder_len) for n in (decoder_len, 3, decoder_len - 2, 1))
        inputs.update(decoder_input_ids=token_ids((b, decoder_len), seed=2), decoder_attention_mask=padding_mask(lengths, decoder_len))
    return inputs


# ------------------------------------------------------------------------------------------------
# the reference of one forward


def layer_name(template: str, i: int, shared: bool = False) -> str:
    """The qualified name of layer ``i`` (ALBERT's shared module: ``name#i``)."""
    return f"{template}#{i}" if shared else template.format(i=i)


def reference_layers(family: Family, outputs: Any, inputs: dict[str, Tensor]) -> list[RefLayer]:
    """Every attention call of ``family``'s forward, in forward order, from the eager ``outputs``."""
    b = _batch_size(inputs)
    if family.arch in ("encoder", "decoder"):
        real = inputs["attention_mask"]
        return [
            RefLayer(
                layer_name(family.names["self"], i, family.shared_layer),
                "self",
                a,
                *self_attention_masks(real, a.shape[2], causal=family.arch == "decoder", window=family.windows(i)),
            )
            for i, a in enumerate(outputs.attentions)
        ]
    if family.arch == "vision":
        return [_unmasked(layer_name(family.names["self"], i), a) for i, a in enumerate(outputs.attentions)]
    if family.arch == "clip":
        vision = [_unmasked(layer_name(family.names["vision"], i), a) for i, a in enumerate(outputs.vision_model_output.attentions)]
        real = inputs["attention_mask"]
        text = [
            RefLayer(layer_name(family.names["text"], i), "self", a, *self_attention_masks(real, a.shape[2], causal=True))
            for i, a in enumerate(outputs.text_model_output.attentions)
        ]
        return vision + text  # CLIPModel.forward runs the vision tower first
    # seq2seq / speech
    if family.arch == "speech":
        encoder_real = torch.ones(b, outputs.encoder_attentions[0].shape[-1], dtype=torch.long)
    else:
        encoder_real = inputs["attention_mask"]
    decoder_real = inputs["decoder_attention_mask"]
    layers = [
        RefLayer(layer_name(family.names["enc"], i), "self", a, *self_attention_masks(encoder_real, a.shape[2], causal=False))
        for i, a in enumerate(outputs.encoder_attentions)
    ]
    for i, (a_self, a_cross) in enumerate(zip(outputs.decoder_attentions, outputs.cross_attentions, strict=True)):
        self_masks = self_attention_masks(decoder_real, a_self.shape[2], causal=True)
        layers.append(RefLayer(layer_name(family.names["dec"], i), "self", a_self, *self_masks))
        layers.append(RefLayer(layer_name(family.names["cross"], i), "cross", a_cross, *cross_attention_masks(decoder_real, encoder_real)))
    return layers


def _unmasked(name: str, probs: Tensor) -> RefLayer:
    b, _, lq, lk = probs.shape
    return RefLayer(name, "self", probs, *self_attention_masks(torch.ones(b, lk, dtype=torch.long), lq, causal=False))


def _batch_size(inputs: dict[str, Tensor]) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, Tensor))


@dataclass
class Case:
    """One forward of a family to capture, and its reference."""

    family: Family
    impl: str
    eager: nn.Module = field(repr=False)  # the eager model the reference comes from
    expected: list[RefLayer] = field(repr=False)
    calls: list[str]  # the declared attention modules in the order the reference forward called them
    prepare: Callable[[nn.Module], dict[str, Any]] = field(repr=False)
    """Runs on the model under test BEFORE the capture (a decode step's prefix); returns the captured call's kwargs."""

    def model(self) -> nn.Module:
        """The model under test: the eager model itself, or a copy of its weights under ``impl``."""
        return self.eager if self.impl == "eager" else self.family.build(self.impl, self.eager.state_dict())

    def reference(self) -> dict[str, dict[str, Tensor]]:
        """Self-checked reference statistics (masks against the eager probabilities, forward order)."""
        names = [layer.name for layer in self.expected]
        assert self.calls == names, f"reference layer order {names} != modules called {self.calls}"
        return reference_stats(self.expected)


def reference_forward(family: Family, eager: nn.Module, impl: str, kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """The eager model's outputs with ``output_attentions=True`` (as the SDPA path computes them when
    ``impl`` is ``"sdpa"``, see :attr:`Family.sdpa_reference`), and the attention modules' call order."""
    handles = family.sdpa_reference(eager) if impl == "sdpa" and family.sdpa_reference is not None else []
    try:
        with recorded_calls(eager, family) as calls, torch.no_grad():
            outputs = eager(**kwargs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, calls


def padded_case(
    name: str | Family, impl: str, *, left: bool = False, decoder_len: int = SEQ_LEN, decoder_lengths: tuple[int, ...] | None = None
) -> Case:
    """A padded batch of :func:`family_inputs` through one forward."""
    family = FAMILIES[name] if isinstance(name, str) else name
    eager = family.build("eager")
    inputs = family_inputs(family, left=left, decoder_len=decoder_len, decoder_lengths=decoder_lengths)
    outputs, calls = reference_forward(family, eager, impl, inputs)
    return Case(family, impl, eager, reference_layers(family, outputs, inputs), calls, lambda model: inputs)


def decode_step_case(name: str | Family, impl: str) -> Case:
    """One new token per row after a LEFT-padded prefix in the KV cache: only the step is captured.

    Keys: the cached prefix (its pads invalid) and the new token; the query sits at key position
    ``SEQ_LEN`` (bottom-right); the sink is each row's first real prefix token.
    """
    family = FAMILIES[name] if isinstance(name, str) else name
    assert family.arch == "decoder"
    eager = family.build("eager")
    b = len(LENGTHS)
    prefix = dict(input_ids=token_ids((b, SEQ_LEN)), attention_mask=padding_mask(LENGTHS, SEQ_LEN, left=True))
    full_mask = torch.cat([prefix["attention_mask"], torch.ones(b, 1, dtype=torch.long)], dim=1)
    step_ids = token_ids((b, 1), seed=3)

    def prepare(model: nn.Module) -> dict[str, Any]:
        with torch.no_grad():
            cache = model(**prefix, use_cache=True).cache
        return dict(input_ids=step_ids, attention_mask=full_mask, cache=cache, use_cache=True)

    outputs, calls = reference_forward(family, eager, impl, prepare(eager))
    expected = reference_layers(family, outputs, {"attention_mask": full_mask})
    assert all(layer.probs.shape[2:] == (1, SEQ_LEN + 1) for layer in expected)
    return Case(family, impl, eager, expected, calls, prepare)


PACKED_POSITION_IDS = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
"""Two packed rows: documents of 3, 4 and 1 tokens, then of 5 and 3 tokens."""


def documents_from_positions(position_ids: Tensor) -> Tensor:
    """Document id of each token of packed rows: a document starts where the position is 0."""
    return (position_ids == 0).long().cumsum(-1) - 1


def packed_case(name: str | Family, impl: str) -> Case:
    """Packed documents told by ``position_ids`` alone (no attention mask, no cache): block-diagonal causal."""
    family = FAMILIES[name] if isinstance(name, str) else name
    assert family.arch == "decoder"
    eager = family.build("eager")
    b, seq = PACKED_POSITION_IDS.shape
    inputs = dict(input_ids=token_ids((b, seq)), position_ids=PACKED_POSITION_IDS, use_cache=False)
    outputs, calls = reference_forward(family, eager, impl, inputs)
    documents = documents_from_positions(PACKED_POSITION_IDS)
    real = torch.ones(b, seq, dtype=torch.long)
    expected = [
        RefLayer(layer_name(family.names["self"], i), "self", a, *self_attention_masks(real, seq, causal=True, documents=documents))
        for i, a in enumerate(outputs.attentions)
    ]
    return Case(family, impl, eager, expected, calls, lambda model: inputs)


@contextmanager
def recorded_calls(model: nn.Module, family: Family) -> Iterator[list[str]]:
    """The names of the attention modules ``family`` declares, appended as they run (``name#k`` for
    the k-th call of a shared module), via test-side forward pre-hooks."""
    candidates = {template.format(i=i) for template in family.names.values() for i in range(64)}
    watched = {name: module for name, module in model.named_modules() if name in candidates}
    assert watched, f"no module of {family.name} is named like {list(family.names.values())}"
    calls: list[str] = []
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any) -> None:
            k = counts.get(name, 0)
            counts[name] = k + 1
            calls.append(f"{name}#{k}" if family.shared_layer else name)

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in watched.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------
# plain torch: packed documents through one SDPA call per layer


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention over packed documents (a block-diagonal bool mask), by SDPA or by hand."""

    def __init__(self, dim: int = 16, heads: int = 4, causal: bool = True, use_sdpa: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.causal, self.use_sdpa = causal, use_sdpa

    def split(self, x: Tensor, proj: nn.Linear) -> Tensor:
        b, seq, _ = x.shape
        return proj(x).view(b, seq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]

    def forward(self, x: Tensor, documents: Tensor) -> Tensor:
        b, seq, c = x.shape
        mask = documents[:, None, :, None] == documents[:, None, None, :]  # [B, 1, L, L]
        if self.causal:
            mask = mask & torch.ones(seq, seq, dtype=torch.bool).tril()
        q, k, v = self.split(x, self.q), self.split(x, self.k), self.split(x, self.v)
        if self.use_sdpa:
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            att = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        return self.o(y.transpose(1, 2).reshape(b, seq, c))


class PackedDocumentsModel(nn.Module):
    """Embedding + 2 residual :class:`PackedSelfAttention` layers; ``forward(input_ids, documents)``."""

    def __init__(self, causal: bool, use_sdpa: bool, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(PackedSelfAttention(dim, causal=causal, use_sdpa=use_sdpa) for _ in range(2))
        randomize(self, std=0.5)

    def forward(self, input_ids: Tensor, documents: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x, documents)
        return x


PACKED_DOCUMENTS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 2, 2, 2, 2, 2]])
"""Document ids of two packed rows: 2 documents (4 + 5 tokens), then 3 (3 + 1 + 5 tokens)."""


def per_document_reference(model: PackedDocumentsModel, input_ids: Tensor, documents: Tensor) -> dict[str, dict[str, Tensor]]:
    """``{"layers.i": stats}``: every document run SEPARATELY through the layer's float64 q/k (its own
    softmax), positions and sink local to the document, then sums pooled over documents and rows.

    SELF-CHECK: the per-document attention reproduces the layer's actual output on that document.
    """
    seen: list[tuple[Tensor, Tensor]] = []  # (input, output) of each layer
    handles = [layer.register_forward_hook(lambda m, a, out: seen.append((a[0].detach(), out.detach()))) for layer in model.layers]
    try:
        with torch.no_grad():
            model(input_ids, documents)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for index, (layer, (x, y)) in enumerate(zip(model.layers, seen, strict=True)):
        total: dict[str, Tensor] = {}
        count = 0
        for b in range(x.shape[0]):
            for doc in documents[b].unique().tolist():
                tokens = documents[b] == doc
                ref, y_doc = _document_attention(layer, x[b, tokens])
                torch.testing.assert_close(
                    y_doc.float(), y[b, tokens], rtol=1e-4, atol=1e-5, msg="per-document attention != the layer's output"
                )
                check_masks(ref)
                sums, n = statistic_sums(ref)
                total = {k: total.get(k, 0) + v for k, v in sums.items()}
                count += n
        out[f"layers.{index}"] = means(total, count)
    return out


def _document_attention(layer: PackedSelfAttention, x: Tensor) -> tuple[RefLayer, Tensor]:
    """One document ``x [n, C]`` alone: the float64 softmax of its own queries over its own keys, and
    the layer's output computed from it."""
    n = x.shape[0]
    x = x.double()

    def project(proj: nn.Linear) -> Tensor:
        return x @ proj.weight.double().T + proj.bias.double()

    def heads(t: Tensor) -> Tensor:
        return t.view(n, layer.heads, layer.head_dim).transpose(0, 1)  # [H, n, D]

    q, k, v = heads(project(layer.q)), heads(project(layer.k)), heads(project(layer.v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)  # [H, n, n]
    key_valid = torch.ones(n, n, dtype=torch.bool)
    if layer.causal:
        key_valid = key_valid.tril()
    probs = logits.masked_fill(~key_valid, -math.inf).softmax(-1)
    y = (probs @ v).transpose(0, 1).reshape(n, -1) @ layer.o.weight.double().T + layer.o.bias.double()
    query_valid, sink = torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.long)
    ref = RefLayer("document", "self", probs[None], key_valid[None], query_valid, sink)
    return ref, y


def packed_documents_batch() -> tuple[Tensor, Tensor]:
    """``input_ids`` and document ids (:data:`PACKED_DOCUMENTS`) for :class:`PackedDocumentsModel`."""
    ids = torch.randint(50, PACKED_DOCUMENTS.shape, generator=torch.Generator().manual_seed(4))
    return ids, PACKED_DOCUMENTS.clone()
