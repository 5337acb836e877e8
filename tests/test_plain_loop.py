"""AttentionMonitorLoop in a hand-written loop: statistics against float64 references, exact penalty
gradients, evaluation, hooks, and the runnable example."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from attnmonitor.integrations.loop import AttentionMonitorLoop
from tests.helpers.events import read_events
from tests.helpers.models import SdpaAttention, TinyTransformer, layer_inputs, qk64
from tests.helpers.reference import NAMES, assert_stats_close, attention_probs, head_means
from tests.helpers.reference import logged as reference_logged
from tests.helpers.regularization import LAMBDA_H, LAMBDA_S, TARGET, assert_same_gradients, reference_forward, reference_terms

EXAMPLE = Path(__file__).parents[1] / "examples" / "plain_loop.py"
REGULARIZER = {"entropy_weight": LAMBDA_H, "entropy_target": TARGET, "sparsity_weight": LAMBDA_S}


def _micro_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of 3 sequences of length 7, right-padded (lengths 7, 4, 1 and 5, 7, 2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([7, 4, 1], [5, 7, 2]):
        mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": torch.randint(50, (3, 7), generator=g), "attention_mask": mask})
    return out


def _model(dtype: torch.dtype = torch.float32) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(SdpaAttention, dropout=0.0).to(dtype)


def _reference(model: TinyTransformer, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Float64 ``{statistic: [layers, heads]}`` over the valid rows of all micro-batches."""
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    inputs = layer_inputs(model, list(model.layers), ids, mask)
    per_layer = []
    for layer, x in zip(model.layers, inputs, strict=True):
        probs = attention_probs(*qk64(layer, x), mask.bool()[:, None, None, :])
        per_layer.append(head_means(probs, mask.bool()[:, None, None, :], mask.bool()[:, None, :]))
    return {name: torch.stack([d[name] for d in per_layer]) for name in NAMES}


def _logged(scalars: dict[str, float], stage: str) -> dict[str, torch.Tensor]:
    """``{statistic: [layers, heads]}`` from the per-head scalars a publication returned (a statistic
    not logged, the next-token weight of causal attention, is left out)."""
    return {
        name: torch.tensor([[scalars[f"attn_{stage}_heads/{name}/layers.{i}/head_{h}"] for h in range(4)] for i in range(2)])
        for name in NAMES
        if f"attn_{stage}_heads/{name}/layers.0/head_0" in scalars
    }


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captured_step_equals_float64_reference_over_all_micro_batches(tmp_path):
    model, batches = _model(), _micro_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    logged = {}
    with (
        SummaryWriter(tmp_path) as writer,
        AttentionMonitorLoop(
            model,
            schedule={"every_n_steps": 2, "atlas_every_n_steps": 4},
            dashboards={"per_head": True, "heatmaps": {"every_n_steps": 2, "max_tokens": 8}},
        ) as monitor,
    ):
        for step in range(4):
            for batch in batches:
                with monitor.step(step, batch):
                    loss = model(**batch).square().mean() + monitor.penalty()
                (loss / len(batches)).backward()
            optimizer.step()
            optimizer.zero_grad()
            logged[step] = monitor.log(writer)
        assert monitor.engine.capture is not None and _hooks(model) > 0
    assert _hooks(model) == 0  # closing removed every hook
    assert [step for step, scalars in logged.items() if scalars] == [1, 3]  # due steps only
    assert_stats_close(_logged(logged[1], "train"), reference_logged(_reference(model, batches)), rtol=1e-5, atol=1e-6)
    events = read_events(tmp_path)
    assert [e.step for e in events.Scalars("attn_train/entropy")] == [1, 3]
    assert [e.step for e in events.Images("attn_train_heatmap/layers.0/head_0")] == [1, 3]
    assert [e.step for e in events.Images("attn_train/atlas/entropy")] == [3]


def test_penalty_gradients_equal_task_plus_penalty_under_gradient_accumulation():
    model, batches = _model(torch.float64), _micro_batches()
    reference = _model(torch.float64)
    with AttentionMonitorLoop(
        model, regularizer=REGULARIZER, schedule={"every_n_steps": 1}, dashboards={"heatmaps": None, "analyses": False}
    ) as monitor:
        for batch in batches:
            with monitor.step(0, batch):
                loss = model(**batch).square().mean() + monitor.penalty()
            (loss / len(batches)).backward()
        scalars = monitor.log()
    for batch in batches:  # by hand: mean over micro-batches of task + λ_H R_H + λ_S R_S
        key_valid = batch["attention_mask"].bool()[:, None, None, :]
        out, probs = reference_forward(reference, batch["input_ids"], key_valid)
        entropy, sparsity = reference_terms(probs, key_valid, batch["attention_mask"].bool()[:, None, :])
        ((out.square().mean() + LAMBDA_H * entropy + LAMBDA_S * sparsity) / len(batches)).backward()
    assert_same_gradients(model, reference)
    assert scalars["attn_reg/entropy"] > 0 and scalars["attn_reg/sparsity"] > 0 and "attn_reg/penalty" in scalars


def test_a_penalty_not_added_to_the_loss_is_warned_about_and_dropped():
    model, batch = _model(), _micro_batches()[0]
    with AttentionMonitorLoop(model, regularizer=REGULARIZER, schedule={"every_n_steps": 5}, dashboards={"heatmaps": None}) as monitor:
        with pytest.warns(RuntimeWarning, match="never added to a loss"), monitor.step(0, batch):
            model(**batch).square().mean().backward()
        assert not monitor.engine.regularizer.pending
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # warned once
            with monitor.step(1, batch):
                model(**batch)


def test_evaluation_probe_equals_reference_and_is_written(tmp_path):
    model, batches = _model(), _micro_batches(seed=1)
    model.eval()
    with (
        SummaryWriter(tmp_path) as writer,
        AttentionMonitorLoop(
            model, schedule={"val_batches": 1}, dashboards={"per_head": True, "heatmaps": {"every_n_steps": None, "max_tokens": 8}}
        ) as monitor,
    ):
        with torch.no_grad():
            for index, batch in enumerate(batches):
                with monitor.eval_batch(index, batch):
                    model(**batch)
        scalars = monitor.log_eval(writer, step=7)
    assert_stats_close(_logged(scalars, "val"), reference_logged(_reference(model, batches[:1])), rtol=1e-5, atol=1e-6)  # first batch
    events = read_events(tmp_path)
    assert [e.step for e in events.Scalars("attn_val/entropy")] == [7]
    assert "attn_val_heatmap/layers.0/head_0" in events.Tags()["images"] and "attn_val/table/text_summary" in events.Tags()["tensors"]


def test_a_step_not_logged_is_published_when_the_next_begins_and_bad_input_is_refused():
    model, batch = _model(), _micro_batches()[0]
    with pytest.raises(ValueError, match="torch.nn.Module"):
        AttentionMonitorLoop("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps"):
        AttentionMonitorLoop(model, schedule={"every_n_steps": 0})
    with AttentionMonitorLoop(model, schedule={"every_n_steps": 1}, dashboards={"heatmaps": None, "analyses": False}) as monitor:
        with pytest.raises(ValueError, match="`step` must be an int >= 0"), monitor.step(-1):
            pass
        for step in range(2):
            with monitor.step(step, batch):
                model(**batch)
        assert monitor.engine.last_train_step == 0  # step 0 published when step 1 began
        assert monitor.engine.latest["attn_train/entropy"] > 0
    assert monitor.engine.last_train_step == 1  # and step 1 when the monitor closed


@pytest.mark.slow
def test_the_plain_loop_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("plain_loop_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    arguments = ["--max-steps", "4", "--every-n-steps", "2", "--batch-size", "4", "--seq-len", "12", "--entropy-weight", "0.1"]
    log_dir = example.main([*arguments, "--log-dir", str(tmp_path)])
    events = read_events(log_dir)
    assert [e.step for e in events.Scalars("attn_train/entropy")] == [1, 3]
    assert [e.step for e in events.Scalars("attn_val/entropy")] == [3]
    assert [e.step for e in events.Scalars("attn_reg/penalty")] == [1, 3]
    assert "attn_val_heatmap/blocks.0.attn/head_0" in events.Tags()["images"]


def test_alarms_warn_call_back_and_ask_the_loop_to_save_and_stop(caplog):
    model = _model()
    calls = []
    alarms = {
        "entropy_collapse": None,
        "sink_jump": {"jump": 1e-9, "span": 4},  # info from the second capture (its history), one episode per head
        "logit_growth": {"ceiling": 0.0, "factor": 1e9, "span": 4},  # a warning at the first capture
        "actions": {"info": calls.append, "warning": "stop"},
        "every_n_steps": 1,
    }
    requests = []
    with AttentionMonitorLoop(
        model, alarms=alarms, schedule={"every_n_steps": 10, "val_batches": 0}, dashboards={"heatmaps": None, "analyses": False}
    ) as monitor:
        for step, batch in enumerate((_micro_batches(0) + _micro_batches(1))[:3]):
            with monitor.step(step, batch):
                model(batch["input_ids"], attention_mask=batch["attention_mask"]).square().mean().backward()
            with caplog.at_level(logging.WARNING, logger="attnmonitor"):
                monitor.log()
            requests.append((monitor.should_checkpoint, monitor.should_stop))
    lines = [r.getMessage() for r in caplog.records if r.name == "attnmonitor"]
    assert lines[0].startswith("attnmonitor alarm [warning] logit_growth at step 0: max_logit of layers.0 heads 0, 1, 2, 3 (")
    assert requests == [(True, True), (False, True), (False, True)]  # the checkpoint once per episode; the stop stays asked
    assert [{(f.rule, f.step) for f in firings} for firings in calls] == [{("sink_jump", 1)}]  # new episodes only, once
