"""Training-health alarms: the rules on synthetic histories, and in a real Lightning run where a head collapses."""

import json
import logging
import re

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import AttentionMonitor
from attnmonitor.alarms import AttentionAlarms, Firing, LogitGrowthConfig, act
from attnmonitor.config import AlarmsConfig, MonitorOptions
from attnmonitor.demo import TinyGPT
from tests.helpers.events import read_events
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer

LAYERS = ["a", "b"]
CADENCE = 10


def _alarms(**rules) -> AttentionAlarms:
    config = {"entropy_collapse": None, "logit_growth": None, "sink_jump": None, **rules}
    return AttentionAlarms(AlarmsConfig(**config))


def _feed(alarms: AttentionAlarms, series: dict[str, list[list[float]]], start: int = 0) -> list[list[Firing]]:
    """Check one capture every ``CADENCE`` steps per row of each ``{statistic: rows}`` (row: the heads of
    layer "a"; layer "b" holds 0.5 in every head); returns each capture's firings."""
    n = len(next(iter(series.values())))
    out = []
    for i in range(n):
        values = {s: torch.tensor([rows[i], [0.5] * len(rows[i])]) for s, rows in series.items()}
        out.append(alarms.check(start + i * CADENCE, LAYERS, values))
    return out


def _geometric(start: float, factor_per_span: float, captures: int, span: int = 100) -> list[float]:
    return [start * factor_per_span ** (i * CADENCE / span) for i in range(captures)]


SUSTAINED = {"span": 100, "factor": 2.0, "sustain": 2, "heads_fraction": 0.5, "floor": 20.0}


def test_logit_growth_grades_sustained_geometric_growth_and_ignores_learning():
    growing = _geometric(40.0, 3.0, 31)  # x3 per 100 steps for 300 steps: the pattern of a divergence
    learning = [2.0 * 1.8**i for i in range(8)] + [200.0] * 23  # from 2 to 200 in 80 steps, then flat
    alarms = _alarms(logit_growth=SUSTAINED)
    captures = _feed(alarms, {"max_logit": [[g, g, x] for g, x in zip(growing, learning, strict=True)]})
    severity = {(f.step, f.head): f.severity for fs in captures for f in fs if f.layer == "a" and f.change != "cleared"}
    assert not any(head == 2 for _, head in severity)  # the learning head: its growth started below the floor
    # warning once a span of growth is observed (the earlier quarter-span window must exist: step 100 on)
    assert severity[(100, 0)] == "warning" and (90, 0) not in severity
    # critical after two spans of growth, in 2 of the layer's 3 heads (>= half)
    assert severity[(200, 0)] == "critical" and severity[(190, 0)] == "warning"
    assert not any(f.layer == "b" for fs in captures for f in fs)  # constant: quiet


def test_from_below_floor_measures_growth_from_the_floor():
    """A head that explodes from an unsaturated start (1 -> 1,000 in 100 steps, the ``sort`` family's
    pattern) is not graded by default; with ``from_below_floor`` it is, from the floor: x3 over a span
    is a warning once the head passes 3 x floor, not while it is still below that."""
    exploding = [1000 ** (i / 10) for i in range(9)]  # x2 per capture, 1 to 251; below 20 a span before each
    rule = {"span": 50, "factor": 3.0, "sustain": 1, "heads_fraction": 1.0, "floor": 20.0}
    quiet = _feed(_alarms(logit_growth=rule), {"max_logit": [[x] for x in exploding]})
    assert not any(f.layer == "a" for fs in quiet for f in fs)
    captures = _feed(_alarms(logit_growth={**rule, "from_below_floor": True}), {"max_logit": [[x] for x in exploding]})
    first = next(i for i, fs in enumerate(captures) if any(f.layer == "a" for f in fs))
    # the recent quarter span (two captures) must be >= 3 x 20 in log-mean: first at capture 7 (63, 126)
    assert first == 7 and exploding[first - 1] * exploding[first] >= 60**2 > exploding[first - 2] * exploding[first - 1]
    assert captures[first][0].severity == "critical"  # the layer's only head: heads_fraction met


def test_logit_growth_critical_needs_the_share_of_heads_and_a_ceiling_is_off_by_default():
    assert LogitGrowthConfig().ceiling is None
    growing, flat = _geometric(40.0, 3.0, 31), [500.0] * 31
    captures = _feed(_alarms(logit_growth=SUSTAINED), {"max_logit": [[g, flat[i], flat[i], flat[i]] for i, g in enumerate(growing)]})
    severities = {f.severity for fs in captures for f in fs}
    assert severities == {"warning"}  # one head of 4 < heads_fraction 0.5; 500 is no ceiling by default
    captures = _feed(_alarms(logit_growth={"ceiling": 400.0, "factor": 100.0}), {"max_logit": [[10.0, 500.0]] * 3})
    assert [(f.head, f.severity) for f in captures[0] if f.layer == "a"] == [(1, "warning")]


def test_entropy_collapse_is_info_unless_logits_keep_growing():
    entropy = [[0.8, 0.8]] * 11 + [[0.2, 0.2]] * 2
    logits = [[30.0, 30.0]] * 8 + [[30.0, 90.0]] * 5  # head 1's logits tripled over the span
    captures = _feed(_alarms(entropy_collapse={"span": 100, "logit_factor": 2.0}), {"normalized_entropy": entropy, "max_logit": logits})
    assert [(f.head, f.severity, f.change) for f in captures[11] if f.layer == "a"] == [(0, "info", "started"), (1, "warning", "started")]
    assert [(f.head, f.change) for f in captures[12] if f.layer == "a"] == [(0, "firing"), (1, "firing")]


def test_sink_jump_is_info():
    captures = _feed(_alarms(sink_jump={}), {"sink_mass": [[0.1, 0.1]] * 5 + [[0.9, 0.1]]})
    assert [(f.layer, f.head, f.severity) for f in captures[5]] == [("a", 0, "info")]


def test_an_episode_is_reported_once_escalates_and_clears_after_a_quiet_span():
    alarms = _alarms(logit_growth={"span": 40, "factor": 2.0, "sustain": 2, "heads_fraction": 0.0})
    logits = _geometric(40.0, 3.0, 12, span=40) + [40.0 * 3.0**2.75] * 12  # grows to step 110, then flat
    captures = _feed(alarms, {"max_logit": [[v, 30.0] for v in logits]})
    changes = [(f.step, f.change, f.severity) for fs in captures for f in fs if f.layer == "a" and f.head == 0]
    assert changes[0] == (40, "started", "warning")
    assert [c for _, c, _ in changes[1:-1]] == ["firing", "firing", "firing", "escalated", "firing", "firing", "firing"]
    assert changes[4] == (80, "escalated", "critical")
    # the last firing is at 110 (the quarter-span windows still rise there); quiet from 120 on, the
    # episode clears once it has been quiet for the rule's history (2 spans + a quarter: 90 steps)
    assert changes[-1] == (200, "cleared", "critical")


def test_act_writes_one_line_per_rule_and_severity_and_acts_once_per_episode():
    received = []
    config = AlarmsConfig(
        entropy_collapse=None, sink_jump=None, logit_growth={"span": 40, "factor": 2.0, "sustain": 2, "heads_fraction": 0.0}
    )
    config.actions.update(warning=received.extend, critical="stop")
    alarms = AttentionAlarms(config)
    logged = []
    actions = []
    for fs in _feed(alarms, {"max_logit": [[v, v] for v in _geometric(40.0, 3.0, 12, span=40)]}):
        actions.append(act(fs, config.actions, alarms.hints, lambda level, line: logged.append((level, line))))
    started = [line for _, line in logged if "[warning]" in line]
    assert started == [
        "attnmonitor alarm [warning] logit_growth at step 40: max_logit of a heads 0, 1 (120, 120). "
        "Usual remedies: a lower learning rate, `qk_clip` (tau about 100), or qk-layernorm in the model"
    ]
    assert [f.head for f in received] == [0, 1]  # the callable got the new firings only, once
    assert [a.stop for a in actions].count(True) == 1  # critical started once (step 80): stop once
    critical = next(line for _, line in logged if "[critical]" in line)
    assert critical.startswith("attnmonitor alarm [critical] logit_growth at step 80: max_logit of a heads 0, 1")


def test_a_checkpoint_is_asked_once_while_critical_episodes_overlap():
    config = AlarmsConfig(entropy_collapse=None, sink_jump=None, logit_growth={"span": 40, "factor": 2.0, "heads_fraction": 0.0})
    alarms = AttentionAlarms(config)
    late = [40.0] * 3 + _geometric(40.0, 3.0, 9, span=40)  # head 1 starts growing 30 steps after head 0
    requests = []
    for i, heads in enumerate(zip(_geometric(40.0, 3.0, 12, span=40), late, strict=True)):
        fs = alarms.check(i * CADENCE, LAYERS, {"max_logit": torch.tensor([heads, [0.5, 0.5]])})
        starts = {f.head for f in fs if f.layer == "a" and f.change == "started"}
        requests.append((starts, act(fs, config.actions, alarms.hints, lambda level, line: None, alarms.open_before).checkpoint))
    assert [r for r in requests if r[0]] == [({0}, True), ({1}, False)]  # head 1's episode began while head 0's was open


def test_history_and_episodes_survive_a_state_dict_round_trip_with_another_interval():
    config = {"logit_growth": SUSTAINED}
    series = {"max_logit": [[v, v] for v in _geometric(40.0, 3.0, 31)]}
    first = _alarms(**config)
    assert "attn_train_alarm/logit_growth" not in first.scalars([])  # not charted before it fires
    captures = _feed(first, {"max_logit": series["max_logit"][:15]})  # up to step 140: warning episodes open
    assert first.scalars(captures[-1])["attn_train_alarm/logit_growth"] == 2
    resumed = _alarms(**config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as checkpoints store it
    assert resumed.scalars([])["attn_train_alarm/logit_growth"] == 0  # still charted after the resume
    # the resumed run looks every 20 steps instead of 10: the history is by step, so growth carries on
    later = [
        resumed.check(step, LAYERS, {"max_logit": torch.tensor([series["max_logit"][step // CADENCE], [0.5, 0.5]])})
        for step in range(160, 310, 20)
    ]
    firings = [f for fs in later for f in fs if f.layer == "a"]
    assert firings[0].change == "firing" and firings[0].since == 100  # the episode continues
    assert any(f.change == "escalated" and f.severity == "critical" for f in firings)


@pytest.mark.parametrize(
    ("alarms", "match"),
    [
        ({"entropy_collapse": {"drop": 1.5}}, r"`alarms.entropy_collapse.drop` must be a number in \[0.0, 1.0\], got 1.5"),
        ({"logit_growth": {"factor": 0.5}}, r"`alarms.logit_growth.factor` must be a number in \[1.0, inf\), got 0.5"),
        (
            {"actions": {"critical": "email"}},
            r"`alarms.actions.critical` must be one of \['log', 'warn', 'checkpoint', 'stop'\] or a callable, got 'email'",
        ),
        (
            {"actions": {"fatal": "stop"}},
            r"`alarms.actions` got unknown severities \['fatal'\]; accepted: \['info', 'warning', 'critical'\]",
        ),
        ({"every_n_steps": 0}, r"`alarms.every_n_steps` must be an int >= 1 or None, got 0"),
        (
            {"every_n_steps": 50},
            r"`alarms.entropy_collapse.span` \(50 steps\) needs a capture every 12 steps or more often; `alarms.every_n_steps` is 50",
        ),
        ({"entropy_collapse": {"drop_by": 0.5}}, r"`alarms.entropy_collapse` got unknown keys \['drop_by'\]"),
    ],
)
def test_invalid_alarm_options_are_rejected(alarms, match):
    with pytest.raises(ValueError, match=match):
        MonitorOptions(alarms={"logit_growth": None, **alarms})


def test_a_rule_needs_its_statistic():
    with pytest.raises(ValueError, match=r"`alarms.sink_jump` reads the statistic 'sink_mass', which is not among `capture.statistics`"):
        MonitorOptions(alarms={}, capture={"statistics": ["normalized_entropy", "max_logit"]})
    with pytest.raises(ValueError, match=r"`alarms.entropy_collapse` reads the statistic 'max_logit'"):
        MonitorOptions(alarms={"logit_growth": None}, capture={"statistics": ["normalized_entropy", "sink_mass"]})


def test_the_lightning_state_key_does_not_change_with_the_intervals():
    assert AttentionMonitor(schedule={"every_n_steps": 5}).state_key == AttentionMonitor(schedule={"every_n_steps": 50}).state_key


# ------------------------------------------------------------------------------------------------
# a real run: a callback sharpens every query at one step, the alarm sees the collapse

VOCAB, SEQ, EVERY, SHARPEN_AT = 40, 16, 2, 12


def _loader() -> DataLoader:
    ids = torch.randint(VOCAB, (4 * 40, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)


class _Sharpen(L.Callback):
    """Scales the query projections by 40 when optimizer step ``SHARPEN_AT`` begins: attention collapses."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == SHARPEN_AT:
            with torch.no_grad():
                for block in pl_module.blocks:
                    dim = block.attn.qkv.weight.shape[1]
                    block.attn.qkv.weight[:dim] *= 40.0
                    block.attn.qkv.bias[:dim] *= 40.0


def _fit(tmp_path, action, alarm_every=None, steps=30):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=32, layers=2, heads=2, lr=1e-3)
    alarms = {
        # the sharpening multiplies every logit by 40 at once: growth over a span of 8 steps, critical at once
        "logit_growth": {"span": 8, "sustain": 1, "floor": 0.0},
        "entropy_collapse": {"span": 8},
        "sink_jump": None,
        "actions": {"critical": action},
        "every_n_steps": alarm_every,
    }
    monitor = AttentionMonitor(
        alarms=alarms, schedule={"every_n_steps": EVERY if alarm_every is None else 10}, dashboards={"heatmaps": None}
    )
    trainer = make_trainer(tmp_path, [monitor, _Sharpen()], max_steps=steps, log_every_n_steps=EVERY)
    trainer.fit(model, _loader())
    return trainer, monitor


@ignore_few_batches
@ignore_no_validation_data
def test_a_collapse_stops_training_after_a_checkpoint_and_is_logged(tmp_path, caplog):
    alarm_step = SHARPEN_AT + 1  # the first capture after the collapse (captures at odd steps)
    with caplog.at_level(logging.WARNING, logger="attnmonitor"):
        trainer, _ = _fit(tmp_path, "stop")
    lines = [r.getMessage() for r in caplog.records if r.name == "attnmonitor"]
    heads = r"blocks\.0\.attn heads 0, 1 \(.*\); blocks\.1\.attn heads 0, 1 \(.*\)"
    assert re.fullmatch(
        rf"attnmonitor alarm \[critical\] logit_growth at step {alarm_step}: max_logit of {heads}\. Usual remedies: .*", lines[0]
    )
    assert "training stops after a checkpoint is saved" in lines[-2] and lines[-1].startswith("attnmonitor: alarm checkpoint saved to")
    assert trainer.global_step == alarm_step + 1  # stopped right after that step
    checkpoint = tmp_path / "tb" / "version_0" / "alarm_checkpoints" / f"step={alarm_step}.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == alarm_step + 1
    events = read_events(tmp_path / "tb" / "version_0")
    counts = {e.step: e.value for e in events.Scalars("attn_train_alarm/logit_growth")}
    assert counts == {alarm_step: 4}  # charted from the rule's first firing on: no flat-zero chart before
    severity = {e.step: e.value for e in events.Scalars("attn_train_alarm/severity")}  # the compact chart, every alarm capture
    assert sorted(severity) == list(range(EVERY - 1, alarm_step + 1, EVERY)) and severity[alarm_step] == 3
    text = events.Tensors("attn_train_alarm/logit_growth/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[critical] logit_growth" in text and f"at step {alarm_step}" in text


@ignore_few_batches
@ignore_no_validation_data
def test_alarm_only_captures_feed_a_callable_between_regular_captures(tmp_path):
    received = []
    _, monitor = _fit(tmp_path, received.extend, alarm_every=2, steps=20)
    assert received and min(f.step for f in received) == SHARPEN_AT + 1  # the alarm-only capture after the collapse
    assert {(f.rule, f.severity) for f in received} == {("logit_growth", "critical")} and all(f.new for f in received)
    events = read_events(tmp_path / "tb" / "version_0")
    assert sorted(e.step for e in events.Scalars("attn_train_alarm/logit_growth")) == list(range(SHARPEN_AT + 1, 20, 2))
    assert "attn_train_alarm/entropy_collapse" not in events.Tags()["scalars"]  # never fired at warning
    assert sorted(e.step for e in events.Scalars("attn_train/entropy")) == [9, 19]  # regular captures only
    assert monitor.state_dict()["alarms"]["history"]  # the history goes into checkpoints
