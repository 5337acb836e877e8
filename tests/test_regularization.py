"""Regularizer and clipping: exact gradients and projections against independent references."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnmonitor import AttentionCapture
from attnmonitor.functional.regularization import clip_attention, entropy_penalty, sparsity_penalty
from attnmonitor.regularization import AttentionRegularizer
from tests.helpers.models import EagerAttention, SdpaAttention, TinyTransformer
from tests.helpers.reference import head_means
from tests.helpers.regularization import (
    LAMBDA_H,
    LAMBDA_S,
    TARGET,
    assert_same_gradients,
    reference_forward,
    reference_projection,
    reference_terms,
)

# functional -------------------------------------------------------------------------------------


def test_penalties_match_reference_and_sparsity_has_a_gradient():
    torch.manual_seed(0)
    probs = torch.randn(2, 3, 5, 6, dtype=torch.float64).softmax(-1)
    valid = torch.ones(5, 6, dtype=torch.bool).tril(1)
    probs = probs.masked_fill(~valid, 0)
    probs = (probs / probs.sum(-1, keepdim=True)).requires_grad_(True)
    entropy_ref, sparsity_ref = reference_terms([probs], valid, torch.ones(1, 1, 5, dtype=torch.bool))
    torch.testing.assert_close(entropy_penalty(probs, valid, target=TARGET).mean(), entropy_ref)
    torch.testing.assert_close(sparsity_penalty(probs, valid).mean(), sparsity_ref)
    # the seed's mean(|w|) is the constant 1/Lk for softmax rows: its gradient along the simplex is zero
    grad = torch.autograd.grad(sparsity_penalty(probs, valid).sum(), probs)[0]
    tangent = grad - (grad * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)  # along sum(w) = const
    assert (tangent * valid).abs().max() > 0.1


def test_entropy_target_in_nats():
    probs = torch.full((1, 1, 1, 4), 0.25)
    torch.testing.assert_close(entropy_penalty(probs, target=1.0, relative=False), torch.full((1, 1, 1), (math.log(4) - 1) ** 2))


def test_clip_fixes_the_seed_counterexample():
    clipped, at_bound = clip_attention(torch.tensor([0.99, 0.01]), max=0.8)
    torch.testing.assert_close(clipped, torch.tensor([0.8, 0.2]))
    assert at_bound.tolist() == [True, False]


@pytest.mark.parametrize("lo,hi", [(0.0, 0.3), (0.05, 0.5), (0.1, 0.2), (0.0, 1.0)])
def test_clip_equals_reference_projection_with_masks(lo, hi):
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 6, 8, dtype=torch.float64) * 3
    valid = torch.rand(3, 1, 6, 8) > 0.25
    valid[0, 0, 0] = False  # a fully masked row
    valid[1, 0, 1] = False
    valid[1, 0, 1, 3] = True  # a one-key row
    probs = logits.masked_fill(~valid, -math.inf).softmax(-1).nan_to_num(0.0)
    clipped, _ = clip_attention(probs, valid, min=lo, max=hi)
    kv = valid.expand_as(probs)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in probs.shape[:-1])).tolist():
        mask = kv[tuple(index)]
        row = clipped[tuple(index)]
        if not mask.any():
            assert not row.any()
            continue
        expected = reference_projection(probs[tuple(index)][mask].tolist(), lo, hi)
        torch.testing.assert_close(row[mask], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
        assert not row[~mask].any()
        feasible = hi * int(mask.sum()) >= 1 and lo * int(mask.sum()) <= 1
        if feasible:
            assert row[mask].min() >= lo - 1e-9 and row[mask].max() <= hi + 1e-9
        assert abs(float(row.sum()) - 1) < 1e-6


def test_infeasible_caps_give_uniform_rows():
    clipped, at_bound = clip_attention(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]), min=0.0, max=0.25)
    torch.testing.assert_close(clipped, torch.full((2, 3), 1 / 3))
    assert not at_bound.any()
    clipped, _ = clip_attention(torch.tensor([0.9, 0.1]), min=0.6, max=1.0)  # min * n > 1
    torch.testing.assert_close(clipped, torch.tensor([0.5, 0.5]))


def test_clip_gradient_matches_finite_differences_and_is_finite_on_degenerate_rows():
    torch.manual_seed(2)
    probs = torch.randn(4, 7, dtype=torch.float64).softmax(-1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: clip_attention(p, min=0.02, max=0.3)[0], (probs,))
    degenerate = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [False, False, False], [True, True, False]])
    out, _ = clip_attention(degenerate, valid, min=0.1, max=0.6)
    (out * torch.arange(3.0)).sum().backward()
    assert torch.isfinite(degenerate.grad).all()


def test_clip_rejects_bad_bounds():
    with pytest.raises(ValueError, match="0 <= min <= max <= 1"):
        clip_attention(torch.rand(3), min=0.5, max=0.2)


# gradients through models -----------------------------------------------------------------------


def _regularized_loss(model, regularizer, ids, mask):
    with AttentionCapture(model, regularizer=regularizer) as cap:
        cap.enabled = False
        out = model(ids, attention_mask=mask)
        return out.square().mean() + regularizer.penalty()


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
@pytest.mark.parametrize("options", [dict(causal=True), dict(heads=4, kv_heads=2)], ids=["causal", "gqa"])
def test_gradients_equal_hand_written_task_plus_penalty(layer, options):
    torch.manual_seed(3)
    model = TinyTransformer(layer, dropout=0.0, **options).double().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    regularizer = AttentionRegularizer(regularizer={"entropy_weight": LAMBDA_H, "entropy_target": TARGET, "sparsity_weight": LAMBDA_S})
    _regularized_loss(model, regularizer, ids, mask).backward()
    key_valid = mask.bool()[:, None, None, :]
    if options.get("causal"):
        key_valid = key_valid & torch.ones(7, 7, dtype=torch.bool).tril()
    out, probs = reference_forward(reference, ids, key_valid)
    entropy_term, sparsity_term = reference_terms(probs, key_valid, mask.bool()[:, None, :])
    (out.square().mean() + LAMBDA_H * entropy_term + LAMBDA_S * sparsity_term).backward()
    assert_same_gradients(model, reference)


def test_multihead_attention_gradients_and_clipped_returned_weights():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    reference = copy.deepcopy(mha)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    regularizer = AttentionRegularizer(regularizer={"entropy_weight": LAMBDA_H, "entropy_target": TARGET, "sparsity_weight": LAMBDA_S})
    with AttentionCapture(mha, regularizer=regularizer) as cap:
        cap.enabled = False
        out, _ = mha(x, x, x, need_weights=False)
        (out.square().mean() + regularizer.penalty()).backward()
    ref_out, weights = reference(x, x, x, need_weights=True, average_attn_weights=False)
    everything = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    entropy_term, sparsity_term = reference_terms([weights], everything, torch.ones(1, 1, 5, dtype=torch.bool))
    (ref_out.square().mean() + LAMBDA_H * entropy_term + LAMBDA_S * sparsity_term).backward()
    assert_same_gradients(mha, reference)
    with AttentionCapture(mha, regularizer=AttentionRegularizer(clip={"max": 0.3})):
        _, clipped = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert clipped.max() <= 0.3 + 1e-9
    torch.testing.assert_close(clipped.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
def test_clipped_forward_equals_reference_from_clipped_weights(layer):
    torch.manual_seed(5)
    model = TinyTransformer(layer, causal=True, dropout=0.0).double().train()
    ids = torch.randint(50, (2, 6))
    key_valid = torch.ones(6, 6, dtype=torch.bool).tril()
    with AttentionCapture(model, regularizer=AttentionRegularizer(clip={"min": 0.0, "max": 0.4})) as cap:
        out = model(ids)
    expected, used = reference_forward(model, ids, key_valid, clip=(0.0, 0.4))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # statistics describe the weights used (rows with n_i < 1 / 0.4 keys are infeasible: uniform)
    expected_max = torch.stack([head_means(p.detach(), key_valid)["max_weight"] for p in used])
    torch.testing.assert_close(cap.stats()["max_weight"].double(), expected_max, rtol=1e-5, atol=1e-6)
    model.eval()
    with AttentionCapture(model, regularizer=AttentionRegularizer(clip={"max": 0.4})) as cap, torch.no_grad():
        model(ids)  # training_only: eval forward is not clipped
    assert cap.stats()["max_weight"].max() > 0.4


class Checkpointed(TinyTransformer):
    """TinyTransformer with activation checkpointing around every attention layer."""

    def __init__(self, use_reentrant: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.use_reentrant = use_reentrant

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + checkpoint(layer, x, use_reentrant=self.use_reentrant)
        return x


def test_reentrant_checkpointing_is_reported_instead_of_a_silent_zero_penalty():
    model = Checkpointed(use_reentrant=True, dropout=0.0).train()
    regularizer = AttentionRegularizer(regularizer={"entropy_weight": 1.0})
    with pytest.raises(RuntimeError, match="carried no gradient.*reentrant"):
        _regularized_loss(model, regularizer, torch.randint(50, (2, 5)), None)


def test_non_reentrant_checkpointing_counts_once_and_keeps_exact_gradients():
    torch.manual_seed(12)
    plain = TinyTransformer(dropout=0.0, causal=True).double().train()
    checkpointed = Checkpointed(use_reentrant=False, dropout=0.0, causal=True).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    ids = torch.randint(50, (2, 6))
    counts = []
    for model in (plain, checkpointed):
        regularizer = AttentionRegularizer(regularizer={"entropy_weight": LAMBDA_H, "entropy_target": TARGET}, clip={"max": 0.6})
        with AttentionCapture(model, regularizer=regularizer) as cap:
            (model(ids).square().mean() + regularizer.penalty()).backward()  # the recompute runs inside backward
            counts.append(cap.valid_rows()["layers.0"])
            assert not regularizer.pending  # the recompute added no penalty terms
    torch.testing.assert_close(counts[1], counts[0])  # one update per step, not two
    assert_same_gradients(checkpointed, plain)
