"""AttentionCapture on 25 Hugging Face families, eager and SDPA, against an independent float64 reference.

The reference (``tests/helpers/hf_families.py``) uses the eager model's own ``output_attentions`` and masks
built here from the inputs, and checks itself against those probabilities before any capture runs:
a ``test_reference_*`` failure is a harness bug, a ``test_capture_*`` failure is a capture bug.

Scenarios: every family and implementation on a right-padded batch (CLIP: padded text as long as the
vision tower's patches + 1); left padding for the decoder-only families; encoder-decoder models with a
decoder as long as and shorter than the source, both padded; one KV-cache decode step after a
left-padded prefix; packed documents (Llama ``position_ids``, and a plain torch module with a
block-diagonal mask through SDPA or a hand-written softmax).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable

import pytest
import torch

from attnmonitor import AttentionCapture
from tests.helpers.reference import head_means

# skip the module without transformers, before importing the harness, which imports transformers at its top
pytest.importorskip("transformers")

from tests.helpers import hf_families as hf  # noqa: E402

IMPLS = ("eager", "sdpa")
RTOL, ATOL = 1e-5, 1e-6  # float32 capture vs float64 reference of float32 probabilities: no family (ALiBi ones included) needs more
EXPECTED_STATISTICS = {"self": {*hf.ALL_STATISTICS, "max_logit"}, "cross": {*hf.CROSS_STATISTICS, "max_logit"}}
"""``max_logit`` needs the logits, which the eager probabilities of the reference do not give: here it is
only required finite on every head; ``test_max_logit_eager_equals_sdpa`` compares the two
implementations' logits (eager: the softmax input; SDPA: recomputed from q, k and the mask)."""


def family_params(names: Iterable[str], impls: Iterable[str] = IMPLS) -> list:
    """``(name, impl)`` params; implementations a family lacks are skipped here, with the reason."""
    params = []
    for name in names:
        unsupported = hf.FAMILIES[name].unsupported
        for impl in impls:
            marks = [pytest.mark.skip(reason=f"{name}: {unsupported[impl]}")] if impl in unsupported else []
            params.append(pytest.param(name, impl, id=f"{name}-{impl}", marks=marks))
    return params


ALL = family_params(hf.FAMILIES)
DECODERS = family_params(hf.DECODERS)
SEQ2SEQ = family_params(hf.SEQ2SEQ)
DECODER_PADDING = {8: (6, 8, 2, 4), 5: (5, 2, 4, 1)}
"""Real decoder tokens per row in the encoder-decoder scenario (encoder rows: ``hf.LENGTHS``)."""

SCENARIOS: dict[str, Callable[[str, str], hf.Case]] = {
    "right": lambda name, impl: hf.padded_case(name, impl),
    "left": lambda name, impl: hf.padded_case(name, impl, left=True),
    "dec8": lambda name, impl: hf.padded_case(name, impl, decoder_len=8, decoder_lengths=DECODER_PADDING[8]),
    "dec5": lambda name, impl: hf.padded_case(name, impl, decoder_len=5, decoder_lengths=DECODER_PADDING[5]),
    "decode": hf.decode_step_case,
    "packed": hf.packed_case,
}
SCENARIO_FAMILIES = {
    "right": ALL,
    "left": DECODERS,
    "dec8": SEQ2SEQ,
    "dec5": SEQ2SEQ,
    "decode": family_params(["llama-gqa", "gpt2"]),
    "packed": family_params(["llama-gqa"]),
}


# ------------------------------------------------------------------------------------------------
# helpers


def capture(case: hf.Case) -> tuple[AttentionCapture, list[str]]:
    """Capture ``case``'s forward on the model under test; also returns the warnings it raised."""
    model = case.model()
    kwargs = case.prepare(model)  # e.g. a decode step's prefix: not captured
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionCapture(model) as cap, torch.no_grad():
            model(**kwargs)
    return cap, [str(w.message) for w in caught if "attnmonitor" in str(w.message)]


def capture_problems(cap: AttentionCapture, kinds: dict[str, str], reference: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Every way ``cap`` differs from the reference: layer order (that of ``kinds``), kinds, statistic
    sets (no positional statistic for cross-attention) and values."""
    problems = []
    if cap.layers != list(kinds):
        problems.append(f"layers: got {cap.layers}, expected {list(kinds)}")
    got_kinds = getattr(cap, "kinds", "<no AttentionCapture.kinds>")
    if got_kinds != kinds:
        problems.append(f"kinds: got {got_kinds}, expected {kinds}")
    try:
        actual = cap.layer_stats()
    except RuntimeError as err:
        return [*problems, f"layer_stats() raised {err}"]
    for layer, kind in kinds.items():
        got = actual.get(layer)
        if got is None:
            problems.append(f"{layer}: missing from layer_stats()")
            continue
        wanted = EXPECTED_STATISTICS[kind]
        if set(got) != wanted:
            problems.append(f"{layer} ({kind}): statistics {sorted(got)}, expected {sorted(wanted)}")
        if "max_logit" in got and not bool(torch.isfinite(got["max_logit"]).all()):
            problems.append(f"{layer} max_logit: got {_fmt(got['max_logit'])}, expected finite values")
        for statistic in sorted(wanted & set(got) & set(reference[layer])):
            value, want = got[statistic].detach().double().cpu(), reference[layer][statistic]
            try:
                torch.testing.assert_close(value, want, rtol=RTOL, atol=ATOL)
            except AssertionError:
                problems.append(f"{layer} {statistic}: got {_fmt(value)}, expected {_fmt(want)}")
    return problems


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in t.tolist()) + "]"


def check_capture(case: hf.Case) -> None:
    """The reference checks itself first (so a harness bug is never blamed on the capture), then the
    capture must report the same layers, kinds and statistics."""
    reference = case.reference()
    cap, caught = capture(case)
    problems = capture_problems(cap, {layer.name: layer.kind for layer in case.expected}, reference)
    detail = "".join(f"\n  warning: {w}" for w in caught)
    assert not problems, f"{len(problems)} problem(s):\n  " + "\n  ".join(problems) + detail


# ------------------------------------------------------------------------------------------------
# the harness itself (no capture involved)


@pytest.mark.parametrize(
    ("scenario", "name", "impl"),
    [
        pytest.param(scenario, *p.values, id=f"{scenario}-{p.id}", marks=p.marks)
        for scenario, params in SCENARIO_FAMILIES.items()
        for p in params
    ],
)
def test_reference_self_checks(scenario, name, impl):
    """Every case's reference masks agree with the eager probabilities, in the modules' call order."""
    SCENARIOS[scenario](name, impl).reference()


def test_reference_statistics_equal_the_loop_reference():
    """The vectorised float64 statistics equal ``tests/helpers/reference.py``'s row loops (right padding:
    there the first real token is key 0, the loop reference's sink)."""
    gen = torch.Generator().manual_seed(0)
    real = hf.padding_mask((6, 4, 1, 5), 6)
    for causal in (False, True):
        key_valid, query_valid, sink = hf.self_attention_masks(real, 6, causal=causal, window=hf.causal_window(4))
        logits = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64) * 2
        probs = torch.where(key_valid[:, None], logits, -torch.inf).softmax(-1).nan_to_num(0.0)
        ours = hf.means(*hf.statistic_sums(hf.RefLayer("x", "self", probs, key_valid, query_valid, sink)))
        loops = head_means(probs, key_valid[:, None], query_valid[:, None])
        for statistic in hf.ALL_STATISTICS:
            torch.testing.assert_close(ours[statistic], loops[statistic], rtol=1e-12, atol=1e-12, msg=statistic)


def test_reference_self_check_rejects_wrong_masks():
    """The self-check is not vacuous: a missing window, a spurious causal mask or a wrong ModernBERT
    window width are caught."""
    wrong = [
        dataclasses.replace(hf.FAMILIES["mistral-window"], name="x", windows=lambda i: None),
        dataclasses.replace(hf.FAMILIES["bert"], name="x", arch="decoder"),
        dataclasses.replace(hf.FAMILIES["modernbert"], name="x", windows=lambda i: hf.bidirectional_window(3) if i else None),
        dataclasses.replace(hf.FAMILIES["qwen2-window"], name="x", windows=lambda i: hf.causal_window(hf.WINDOW)),
    ]
    for family in wrong:
        case = hf.padded_case(family, "eager")
        with pytest.raises(AssertionError, match="reference"):
            case.reference()


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "softmax"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_reference_per_document_reproduces_the_packed_model(causal, use_sdpa):
    """Each document run alone gives the packed layer's output on it (checked inside)."""
    model = hf.PackedDocumentsModel(causal=causal, use_sdpa=use_sdpa).eval()
    assert set(hf.per_document_reference(model, *hf.packed_documents_batch())) == {"layers.0", "layers.1"}


# ------------------------------------------------------------------------------------------------
# the capture


@pytest.mark.parametrize(("name", "impl"), ALL)
def test_capture_every_family_right_padding(name, impl):
    """Scenario 1: right-padded batch of 4 (one row of a single real token). Vision models: every patch.
    Whisper: unpadded audio encoder, padded decoder. CLIP: the text batch has as many tokens as the
    vision tower (patches + 1), so a text mask must not be applied to vision rows by shape."""
    check_capture(SCENARIOS["right"](name, impl))


@pytest.mark.parametrize(("name", "impl"), DECODERS)
def test_capture_decoder_left_padding(name, impl):
    """Scenario 2: left padding; the sink is each row's first real token, not key 0."""
    check_capture(SCENARIOS["left"](name, impl))


@pytest.mark.parametrize("scenario", ["dec8", "dec5"], ids=["dec8-equal", "dec5-shorter"])
@pytest.mark.parametrize(("name", "impl"), SEQ2SEQ)
def test_capture_encoder_decoder(name, impl, scenario):
    """Scenario 3: encoder padding (not Whisper's audio) and ``decoder_attention_mask`` padding, decoder
    as long as the source (cross-attention is square: still "cross") and shorter."""
    check_capture(SCENARIOS[scenario](name, impl))


@pytest.mark.parametrize(("name", "impl"), SCENARIO_FAMILIES["decode"])
def test_capture_kv_cache_decode_step(name, impl):
    """Scenario 4: only the one-token step after a left-padded cached prefix is captured (query at key
    position SEQ_LEN; Llama's SDPA path packs the GQA heads into the query length for this step)."""
    check_capture(SCENARIOS["decode"](name, impl))


@pytest.mark.parametrize(("name", "impl"), SCENARIO_FAMILIES["packed"])
def test_capture_packed_position_ids(name, impl):
    """Scenario 5a: documents told by ``position_ids`` only: block-diagonal causal keys, sink per document."""
    check_capture(SCENARIOS["packed"](name, impl))


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "softmax"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_capture_plain_torch_packed_documents(causal, use_sdpa):
    """Scenario 5b: 2 and 3 documents per row through one attention call with a block-diagonal bool
    mask equal, statistic by statistic, to each document run alone (sink: its first token)."""
    model = hf.PackedDocumentsModel(causal=causal, use_sdpa=use_sdpa).eval()
    ids, documents = hf.packed_documents_batch()
    reference = hf.per_document_reference(model, ids, documents)
    with AttentionCapture(model) as cap, torch.no_grad():
        model(ids, documents)
    problems = capture_problems(cap, {name: "self" for name in reference}, reference)
    assert not problems, f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)


@pytest.mark.slow  # Hugging Face compiles flex attention at its first call of each model (about 10 s on CPU)
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("scenario", ["right", "left", "packed"])
@pytest.mark.parametrize("name", ["llama-gqa", "gemma"])
def test_capture_flex_attention_equals_the_eager_model(name, scenario):
    """``attn_implementation="flex_attention"``: padding (BlockMask), packed documents and grouped-query
    heads, against the same weights under eager attention."""
    check_capture(SCENARIOS[scenario](name, "flex_attention"))


MAX_LOGIT_FAMILIES = ["bert", "modernbert", "gpt2", "llama-gqa", "mistral-window", "t5", "bart", "whisper", "vit", "clip"]
"""Relative-position bias (T5), sliding windows, GQA, cross-attention, vision and two towers (Falcon is left
out: its eager path adds ALiBi twice, so its two implementations' logits differ by design)."""


@pytest.mark.parametrize("name", MAX_LOGIT_FAMILIES)
def test_max_logit_eager_equals_sdpa(name):
    """``max_logit`` of the eager implementation (the softmax's input, HF's additive masks and biases
    included) equals that of SDPA (recomputed by the capture from q, k and the mask), head by head."""
    results = []
    for impl in IMPLS:
        cap, _ = capture(hf.padded_case(name, impl))
        results.append({layer: stats["max_logit"] for layer, stats in cap.layer_stats().items()})
    eager, sdpa = results
    assert list(eager) == list(sdpa)
    for layer in eager:
        assert bool(torch.isfinite(eager[layer]).all()), layer
        torch.testing.assert_close(sdpa[layer], eager[layer], rtol=1e-4, atol=1e-4, msg=layer)
