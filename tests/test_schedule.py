"""The capture calendar, without any framework: which steps capture, which draw, which feed the alarms."""

import pytest

from attnmonitor.schedule import Schedule, due


def _captures(schedule: Schedule, steps: int = 20) -> dict[int, str]:
    return {step: kind for step in range(steps) if (kind := schedule.capture(step)) is not None}


def test_due_counts_optimizer_steps_from_zero_as_lightning_logs_them():
    assert [s for s in range(12) if due(s, 4)] == [3, 7, 11]
    assert not any(due(s, None) for s in range(12))
    assert all(due(s, 1) for s in range(5))


def test_regular_captures_only_without_alarms_or_qk_clip():
    assert _captures(Schedule(every_n_steps=5, atlas_every_n_steps=10)) == {4: "train", 9: "train", 14: "train", 19: "train"}


def test_alarm_captures_between_regular_ones_are_light():
    schedule = Schedule(every_n_steps=6, atlas_every_n_steps=60, alarm_every_n_steps=2, alarms=True)
    captures = _captures(schedule, 12)
    assert captures == {1: "light", 3: "light", 5: "train", 7: "light", 9: "light", 11: "train"}
    assert [s for s in range(12) if schedule.alarms_due(s)] == [1, 3, 5, 7, 9, 11]


def test_alarms_read_every_regular_capture_even_without_their_own_interval():
    schedule = Schedule(every_n_steps=3, atlas_every_n_steps=30, alarms=True)
    assert [s for s in range(9) if schedule.alarms_due(s)] == [2, 5, 8]
    assert set(_captures(schedule, 9).values()) == {"train"}


def test_qk_clip_captures_every_step():
    schedule = Schedule(every_n_steps=4, atlas_every_n_steps=40, qk_clip=True)
    captures = _captures(schedule, 8)
    assert sorted(captures) == list(range(8)) and [s for s, k in captures.items() if k == "train"] == [3, 7]
    assert not any(schedule.alarms_due(s) for s in range(8))  # QK-clip alone runs no alarm


@pytest.mark.parametrize(("every", "atlases", "heatmaps", "drawn"), [(2, 4, 6, ([3, 7, 11, 15], [5, 11])), (5, 3, None, ([14], []))])
def test_figures_are_drawn_on_regular_captures_only(every, atlases, heatmaps, drawn):
    schedule = Schedule(
        every_n_steps=every, atlas_every_n_steps=atlases, heatmap_every_n_steps=heatmaps, alarm_every_n_steps=1, alarms=True
    )
    assert ([s for s in range(16) if schedule.atlases(s)], [s for s in range(16) if schedule.heatmaps(s)]) == drawn
