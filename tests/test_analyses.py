"""The seed's analyses: naive float64 references, the seed's own formulas where they are right, known roles."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnmonitor import AttentionCapture, AttentionMonitor
from attnmonitor.analysis import analyse_example, role_changes
from attnmonitor.demo import ReversalDataModule, ReversalModel
from attnmonitor.functional.analyses import (
    FUNCTION_WORDS,
    ROLES,
    alignment_accuracy,
    attention_rollout,
    class_attention_share,
    composition,
    diversity,
    head_roles,
    positional_profile,
    similarity_attention_correlation,
    token_classes,
    top_k_attended,
)
from tests.helpers.events import read_events
from tests.helpers.trainer import ignore_few_batches, make_trainer


def _probs(b=2, h=3, seq=6, seed=0, causal=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, seq, seq, generator=g, dtype=torch.float64) * 2
    valid = torch.ones(seq, seq, dtype=torch.bool).tril() if causal else torch.ones(seq, seq, dtype=torch.bool)
    return logits.masked_fill(~valid, -math.inf).softmax(-1), valid


def test_top_k_matches_the_seed_interpretation():
    probs, valid = _probs(causal=False)
    weights, indices = top_k_attended(probs, k=3, key_valid=valid)
    seed = torch.topk(probs[1, 2, 4], k=3)  # the seed's interpret_attention_weights, one row
    torch.testing.assert_close(weights[1, 2, 4], seed.values)
    assert indices[1, 2, 4].tolist() == seed.indices.tolist()
    weights, _ = top_k_attended(probs, k=3, key_valid=torch.ones(6, 6, dtype=torch.bool).tril())
    assert (weights[:, :, 0, 1:] == 0).all()  # row 0 has one valid key: the rest are padding, weight 0


def test_similarity_correlation_equals_the_seed_for_one_head_and_the_reference_under_masks():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    probs, _ = _probs(b=1, h=2, seq=5, causal=False)
    ours = similarity_attention_correlation(hidden, probs)
    for h in range(2):  # the seed: corrcoef of the flattened cosine-similarity and attention matrices
        similarity = torch.stack(
            [torch.stack([F.cosine_similarity(hidden[0, i], hidden[0, j], dim=0) for j in range(5)]) for i in range(5)]
        )
        seed = torch.corrcoef(torch.stack([similarity.flatten(), probs[0, h].flatten()]))[0, 1]
        assert float(ours[h]) == pytest.approx(float(seed), abs=1e-5)
    causal_probs, valid = _probs(b=1, h=2, seq=5)
    masked = similarity_attention_correlation(hidden, causal_probs, valid)
    pairs = [(i, j) for i in range(5) for j in range(i + 1)]
    for h in range(2):
        xs = [float(F.cosine_similarity(hidden[0, i], hidden[0, j], dim=0)) for i, j in pairs]
        ys = [float(causal_probs[0, h, i, j]) for i, j in pairs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        ref = cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
        assert float(masked[h]) == pytest.approx(ref, abs=1e-5)


def test_composition_against_loops():
    probs, valid = _probs(b=1, h=2, seq=4)
    values = torch.randn(1, 1, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # one kv head
    parts = composition(probs, values, valid)
    for h in range(2):
        for i in range(4):
            raw = [float(probs[0, h, i, j]) * float(values[0, 0, j].norm()) for j in range(i + 1)]
            share = [r / sum(raw) for r in raw]
            entropy = -sum(s * math.log(s) for s in share if s > 0)
            assert float(parts["entropy"][0, h, i]) == pytest.approx(entropy, abs=1e-5)
            assert float(parts["effective_contributors"][0, h, i]) == pytest.approx(math.exp(entropy), abs=1e-4)
            expected = torch.tensor(share, dtype=torch.float64)
            torch.testing.assert_close(parts["contributions"][0, h, i, : i + 1].double(), expected, rtol=1e-5, atol=1e-6)


def test_class_shares_equal_the_seed_ratio_and_loops():
    tokens = ["the", "cat", "sat", "on", "a", "mat"]
    classes = token_classes(tokens)
    assert classes.tolist() == [int(t in FUNCTION_WORDS) for t in tokens] == [1, 0, 0, 1, 1, 0]
    probs, _ = _probs(b=1, h=2, seq=6, causal=False)
    share = class_attention_share(probs, classes, 2)
    for h in range(2):  # the seed: attention received by content / (content + function), over all rows
        content = float(probs[0, h][:, classes == 0].sum())
        function = float(probs[0, h][:, classes == 1].sum())
        assert float(share[h, 0]) == pytest.approx(content / (content + function), abs=1e-6)
    custom = token_classes(tokens, {"animals": frozenset({"cat"}), "things": frozenset({"mat"})})
    assert custom.tolist() == [2, 0, 2, 2, 2, 1]


def test_positional_profile_against_loops_and_seed():
    probs, valid = _probs(b=2, h=2, seq=5)
    profile = positional_profile(probs, valid, window=1)
    for name in ("first", "last", "locality", "normalized_distance", "spread"):
        for h in range(2):
            values = []
            for b in range(2):
                for i in range(5):
                    row = probs[b, h, i, : i + 1].tolist()
                    mean_j = sum(j * a for j, a in enumerate(row))
                    values.append(
                        {
                            "first": row[0],
                            "last": row[-1],
                            "locality": sum(a for j, a in enumerate(row) if abs(i - j) <= 1),
                            "normalized_distance": sum(a * abs(i - j) for j, a in enumerate(row)) / i if i else 0.0,
                            "spread": math.sqrt(sum(a * (j - mean_j) ** 2 for j, a in enumerate(row))) / (i + 1),
                        }[name]
                    )
            assert float(profile[name][h]) == pytest.approx(sum(values) / len(values), abs=1e-5), name
    full, _ = _probs(b=1, h=1, seq=5, causal=False)
    seed_first = full[0, 0].mean(0)[0]  # the seed's first_token_bias: mean over queries of A[:, 0]
    assert float(positional_profile(full)["first"][0]) == pytest.approx(float(seed_first), abs=1e-6)


def test_rollout_against_loops():
    layers = [_probs(b=1, h=2, seq=3, seed=s)[0] for s in range(3)]
    rollout = attention_rollout(layers)
    expected = torch.eye(3, dtype=torch.float64)
    for probs in layers:
        a = probs[0].mean(0) + torch.eye(3, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        expected = a @ expected
    torch.testing.assert_close(rollout[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_diversity_is_the_seed_variance_across_heads():
    probs, _ = _probs(b=1, h=4, seq=5, causal=False)
    seed = torch.var(probs[0], dim=0).mean()  # the seed: var over heads (unbiased), mean over entries
    assert float(diversity(probs)) == pytest.approx(float(seed) * 3 / 4, rel=1e-5)  # population variance


def test_alignment_accuracy_against_loops():
    probs, valid = _probs(b=2, h=2, seq=4, causal=False)
    truth = torch.tensor([[0, 1, 2, -1], [3, 2, 1, 0]])
    accuracy = alignment_accuracy(probs, truth)  # argmax of the head mean, as logged by the monitor
    rows = [(b, i) for b in range(2) for i in range(4) if truth[b, i] >= 0]
    correct = sum(int(sum(probs[b, h, i] for h in range(2)).argmax() == truth[b, i]) for b, i in rows)
    assert float(accuracy) == pytest.approx(correct / len(rows))


class ConstructedAttention(nn.Module):
    """Three heads with fixed causal logits: previous token, first token, uniform."""

    def forward(self, x):
        b, seq, _ = x.shape
        i, j = torch.arange(seq).unsqueeze(1), torch.arange(seq)
        previous = ((j == i - 1) | ((i == 0) & (j == 0))).float() * 20.0
        first = (j == 0).expand(seq, seq).float() * 20.0
        logits = torch.stack([previous, first, torch.zeros(seq, seq)])
        logits = logits.masked_fill(j > i, float("-inf")).expand(b, 3, seq, seq)
        return (logits.softmax(-1) @ x.unsqueeze(1).expand(b, 3, seq, x.shape[-1])).mean(1)


def test_constructed_heads_are_classified_correctly():
    model = nn.Sequential(ConstructedAttention())
    with AttentionCapture(model, example_tokens=32) as cap:
        model(torch.randn(2, 24, 4))
    result = analyse_example(cap.layers, cap.examples, None)
    assert [ROLES[r] for r in result.roles[0].tolist()] == ["previous_token", "sink", "broad"]
    stats = cap.stats()
    roles = head_roles({**stats, "normalized_distance": torch.tensor([[0.05, 0.9, 0.5]])})
    assert [ROLES[r] for r in roles[0].tolist()] == ["previous_token", "sink", "broad"]


# incidental: 16 training batches an epoch, fewer than Lightning's default logging interval
@ignore_few_batches
def test_callback_logs_the_analyses_on_a_real_run(tmp_path):
    data = ReversalDataModule(seq_len=8, vocab_size=12, batch_size=32, train_size=512, val_size=64)
    torch.manual_seed(0)
    model = ReversalModel(vocab_size=12, seq_len=8, dim=32, heads=2, lr=1e-2)
    monitor = AttentionMonitor(schedule={"every_n_steps": 5, "atlas_every_n_steps": 10}, dashboards={"tokenizer": data.decode})
    trainer = make_trainer(tmp_path, [monitor], max_steps=20, val_check_interval=10, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=data)
    events = read_events(tmp_path / "tb" / "version_0")
    tags = events.Tags()
    for stage in ("train", "val"):
        assert f"attn_{stage}_layers/alignment_accuracy/cross_attn" in tags["scalars"]
        example_images = {f"attn_{stage}_example/{name}" for name in ("roles", "rollout", "similarity_correlation")}
        assert example_images <= set(tags["images"])
        assert f"attn_{stage}_example/interpretation/cross_attn/text_summary" in tags["tensors"]
        assert f"attn_{stage}_example/position/first/encoder.self_attn" in tags["scalars"]
    # the monitor's alignment accuracy equals the model's own, computed on the same validation batches
    ours = {e.step: e.value for e in events.Scalars("attn_val_layers/alignment_accuracy/cross_attn")}
    assert set(ours) == {9, 19}  # the steps of the model's own validation metrics
    logs = tmp_path / "tb" / "version_0"
    assert (logs / "projector_config.pbtxt").exists()
    table = events.Tensors("attn_val_example/interpretation/encoder.self_attn/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| query |") and "s" in table.splitlines()[2]


def test_role_changes_are_described():
    before = torch.tensor([[0, 6], [5, 5]])
    after = torch.tensor([[0, 1], [5, 3]])
    assert role_changes(before, after, ["a", "b"]) == ["a head 1: focused -> previous_token", "b head 1: broad -> sink"]
    assert role_changes(None, after, ["a", "b"]) == []


def test_tokens_that_are_markdown_stay_in_their_cells_as_tensorboard_renders_them():
    """A corpus with tables has `|` tokens: the interpretation table escapes every token, so TensorBoard's
    own Markdown renderer shows each row's cells in their columns, with the tokens as written."""
    import re

    from tensorboard.plugin_util import markdown_to_safe_html

    from attnmonitor.analysis.example import interpretation_table

    tokens = ["|", "<s>", "**", "a_b", "x"]
    probs = torch.softmax(torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    html = markdown_to_safe_html(interpretation_table(probs, None, tokens, top_k=2))
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", row, flags=re.S) for row in rows]
    assert [len(c) for c in cells] == [4] * 6  # header + 5 queries: query, attends to, entropy, self
    assert [c[0] for c in cells[1:]] == ["|", "&lt;s&gt;", "**", "a_b", "x"]  # literal, unformatted
    assert all(re.fullmatch(r"\d\.\d{3}", c[2]) for c in cells[1:])  # the entropy column holds entropies
