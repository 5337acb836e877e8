"""Training-health alarms: the rules on synthetic histories, and in a real Lightning run where a head collapses."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import AttentionMonitor
from attnmonitor.alarms import AttentionAlarms
from attnmonitor.config import AlarmsConfig, MonitorOptions
from attnmonitor.demo import TinyGPT
from tests.helpers.events import read_events
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer

LAYERS = ["a", "b"]


def _alarms(**rules) -> AttentionAlarms:
    config = {"entropy_collapse": None, "logit_growth": None, "sink_jump": None, **rules}
    return AttentionAlarms(AlarmsConfig(**config))


def _feed(alarms: AttentionAlarms, statistic: str, series: list[list[float]]) -> list:
    """Check one capture per row of ``series`` (values of heads 0 and 1 of layer "a"; layer "b" constant)."""
    fired = []
    for step, heads in enumerate(series):
        grid = torch.tensor([heads, [0.5, 0.5]])
        fired.append(alarms.check(step, LAYERS, {statistic: grid}))
    return fired


def test_entropy_collapse_fires_on_a_fall_relative_to_the_head_history_only():
    alarms = _alarms(entropy_collapse={"drop": 0.5, "min_drop": 0.1, "window": 4, "warmup": 3, "logit_floor": None})
    # head 0: steady at 0.8 then falls to 0.2; head 1: focused by design (0.12), wobbling down to 0.07
    series = [[0.8, 0.12], [0.8, 0.1], [0.8, 0.12], [0.8, 0.11], [0.2, 0.07]]
    fired = _feed(alarms, "normalized_entropy", series)
    assert all(not f for f in fired[:4])
    (firing,) = fired[4]
    assert (firing.rule, firing.layer, firing.head, firing.value) == ("entropy_collapse", "a", 0, pytest.approx(0.2))
    assert firing.history == pytest.approx((0.8, 0.8, 0.8, 0.8)) and firing.step == 4
    assert "layer 'a' head 0" in firing.message() and "normalized_entropy = 0.2" in firing.message()


def test_entropy_collapse_with_a_logit_floor_needs_large_logits_too():
    """Two heads fall alike; only the one whose max_logit is above the floor (a runaway, not a learnt
    sharpening) fires."""
    alarms = _alarms(entropy_collapse={"window": 3, "warmup": 2})  # logit_floor 30 by default
    assert alarms.statistics == ("normalized_entropy", "max_logit")
    entropy = [[0.9, 0.9], [0.9, 0.9], [0.2, 0.2]]
    logits = [[5.0, 5.0], [6.0, 6.0], [12.0, 150.0]]
    fired = [
        alarms.check(step, ["a"], {"normalized_entropy": torch.tensor([e]), "max_logit": torch.tensor([m])})
        for step, (e, m) in enumerate(zip(entropy, logits, strict=True))
    ]
    assert not fired[0] and not fired[1]
    assert [(f.head, f.value) for f in fired[2]] == [(1, pytest.approx(0.2))]


def test_no_rule_fires_before_its_warmup():
    alarms = _alarms(entropy_collapse={"window": 5, "warmup": 5, "logit_floor": None})
    fired = _feed(alarms, "normalized_entropy", [[0.9, 0.9], [0.9, 0.9], [0.1, 0.1]])
    assert not any(fired)


def test_logit_growth_by_ceiling_and_by_rate_above_the_floor():
    alarms = _alarms(logit_growth={"ceiling": 50.0, "rate": 2.0, "floor": 10.0, "window": 3, "warmup": 2})
    series = [[4.0, 12.0], [5.0, 12.0], [9.0, 30.0], [60.0, 30.0]]  # head 0: 9 > 2 x 4 but below the floor
    fired = _feed(alarms, "max_logit", series)
    assert not fired[0] and not fired[1]
    assert [(f.head, f.value) for f in fired[2]] == [(1, 30.0)]  # 30 > 2 x 12
    assert sorted((f.head, f.value) for f in fired[3]) == [(0, 60.0), (1, 30.0)]  # ceiling; 30 > 2 x 12 still


def test_sink_jump_and_heads_not_observed():
    alarms = _alarms(sink_jump={"jump": 0.3, "window": 3, "warmup": 2})
    series = [[0.1, float("nan")], [0.12, 0.2], [0.11, float("nan")], [0.6, 0.9]]
    fired = _feed(alarms, "sink_mass", series)
    assert not any(fired[:3])
    assert sorted(f.head for f in fired[3]) == [0, 1]  # head 1's history ignores the captures that did not see it


def test_history_survives_a_state_dict_round_trip():
    series = [[0.8, 0.8]] * 3 + [[0.2, 0.8]]
    config = {"entropy_collapse": {"window": 3, "warmup": 3, "logit_floor": None}}
    first = _alarms(**config)
    _feed(first, "normalized_entropy", series[:3])
    resumed = _alarms(**config)
    resumed.load_state_dict(first.state_dict())
    assert [f.head for f in resumed.check(3, LAYERS, {"normalized_entropy": torch.tensor([series[3], [0.5, 0.5]])})] == [0]


@pytest.mark.parametrize(
    ("alarms", "match"),
    [
        ({"entropy_collapse": {"drop": 1.5}}, r"`alarms.entropy_collapse.drop` must be a number in \[0.0, 1.0\], got 1.5"),
        ({"sink_jump": {"window": 2, "warmup": 3}}, r"`alarms.sink_jump.warmup` \(3\) must be <= its `window` \(2\)"),
        ({"entropy_collapse": {"action": "email"}}, r"must be one of \['warn', 'checkpoint', 'stop'\] or a callable, got 'email'"),
        ({"every_n_steps": 0}, r"`alarms.every_n_steps` must be an int >= 1 or None, got 0"),
        ({"entropy_collapse": {"drop_by": 0.5}}, r"`alarms.entropy_collapse` got unknown keys \['drop_by'\]"),
    ],
)
def test_invalid_alarm_options_are_rejected(alarms, match):
    with pytest.raises(ValueError, match=match):
        MonitorOptions(alarms={"logit_growth": None, **alarms})


def test_a_rule_needs_its_statistic():
    with pytest.raises(ValueError, match=r"`alarms.sink_jump` reads the statistic 'sink_mass', which is not among `capture.statistics`"):
        alarms = {"logit_growth": None, "entropy_collapse": {"logit_floor": None}}
        MonitorOptions(alarms=alarms, capture={"statistics": ["entropy", "normalized_entropy"]})
    with pytest.raises(ValueError, match=r"`alarms.entropy_collapse` reads the statistic 'max_logit'"):
        MonitorOptions(alarms={"logit_growth": None}, capture={"statistics": ["normalized_entropy", "sink_mass"]})


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
        "entropy_collapse": {"window": 4, "warmup": 3, "action": action},
        "logit_growth": None,
        "sink_jump": None,
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
def test_a_collapse_stops_training_after_a_checkpoint_and_is_logged(tmp_path):
    alarm_step = SHARPEN_AT + 1  # the first capture after the collapse (captures at odd steps)
    with pytest.warns(RuntimeWarning, match=rf"alarm \[entropy_collapse\] at step {alarm_step}: layer 'blocks\.\d\.attn' head \d"):
        trainer, _ = _fit(tmp_path, "stop")
    assert trainer.global_step == alarm_step + 1  # stopped right after that step
    checkpoint = tmp_path / "tb" / "version_0" / "alarm_checkpoints" / f"step={alarm_step}.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == alarm_step + 1
    events = read_events(tmp_path / "tb" / "version_0")
    counts = {e.step: e.value for e in events.Scalars("attn_alarm/entropy_collapse")}
    assert sorted(counts) == list(range(EVERY - 1, alarm_step + 1, EVERY))
    assert counts[alarm_step] >= 1 and all(v == 0 for step, v in counts.items() if step < alarm_step)
    text = events.Tensors("attn_alarm/entropy_collapse/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "normalized_entropy" in text and f"at step {alarm_step}" in text


@ignore_few_batches
@ignore_no_validation_data
def test_alarm_only_captures_feed_a_callable_between_regular_captures(tmp_path):
    received = []
    with pytest.warns(RuntimeWarning, match="alarm"):
        _, monitor = _fit(tmp_path, received.extend, alarm_every=2, steps=20)
    assert received and min(f.step for f in received) == SHARPEN_AT + 1  # the alarm-only capture after the collapse
    assert {f.rule for f in received} == {"entropy_collapse"} and all(f.action is not None for f in received)
    events = read_events(tmp_path / "tb" / "version_0")
    assert sorted(e.step for e in events.Scalars("attn_alarm/entropy_collapse")) == list(range(1, 20, 2))
    assert sorted(e.step for e in events.Scalars("attn_train/entropy")) == [9, 19]  # regular captures only
    assert monitor.state_dict()["alarms"]  # the history goes into checkpoints
