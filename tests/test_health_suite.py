"""The health suite, reduced to what CI can afford: two of its runs recorded afresh (the copy task at a
stable and at an unstable learning rate, 300 steps each), replayed through the alarms at their
defaults. The full suite and its tables: ``benchmarks/health_suite.py`` and ``docs/alarms.md``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from attnmonitor.alarms import AlarmsConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from health_scenarios import Scenario, record  # noqa: E402
from health_suite import Run, first_spike, replay_alarms, zscore  # noqa: E402

pytestmark = pytest.mark.slow


def _run(lr: float) -> Run:
    torch.manual_seed(0)
    trace = record(Scenario("copy", lr, seed=0, steps=300))
    run = Run("copy", "copy", trace.scenario, trace.losses, trace.grad_norms, trace.layers, trace.stats)
    run.spike = first_spike(run.losses)
    return run


def test_the_default_alarms_see_an_attention_divergence_coming_and_stay_quiet_on_a_healthy_run():
    diverging, healthy = _run(0.3), _run(0.03)
    assert diverging.spike is not None and healthy.spike is None  # the scenarios do what the suite says
    found = replay_alarms(diverging, AlarmsConfig(), every=10)
    assert found.first["critical"] < diverging.spike - 50  # well before the loss spike
    quiet = replay_alarms(healthy, AlarmsConfig(), every=10)
    assert "critical" not in quiet.first and "warning" not in quiet.first
    # the loss z-score (6 sigma over 128 steps) has not fired on the diverging run that early
    assert all(step > found.first["critical"] for step in zscore(diverging.losses))
