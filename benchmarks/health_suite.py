"""Do the alarms see an attention divergence coming, earlier than loss-based detectors, and stay quiet
on healthy runs they were not tuned on?

    python benchmarks/health_suite_record.py            # record the suite's runs (about 15 minutes on 2 cores)
    python benchmarks/health_suite.py [--traces outputs/health_suite] [--round 3] [--every 10] [--tune]
                                      [--markdown FILE] [--figure docs/health-suite.png] [--qk-clip-traces outputs/qk_clip]

Each recorded run (``health_scenarios.py``: families ``lm``, ``copy``, ``seq2seq``, ``sort``, ``recall``, a learning-rate
sweep with and without qk-layernorm, runs diverging through their output logits, 3 seeds) is labelled
from its loss alone, before any detector is looked at:

- **diverged** at its first loss spike: a loss above both twice its running minimum and that minimum
  + 1 nat, after step 50, or not finite; **through attention** without qk-layernorm and with the
  output layer at the common learning rate, **elsewhere** otherwise;
- **healthy**: no spike and a final loss (mean of the last 50 steps) within max(20 %, 0.1 nat) of
  the best final loss of its family;
- **degraded**: neither (reported, not scored).

The alarms are replayed on the recorded per-head statistics through the library's own
``AttentionAlarms``, looking every ``--every`` steps as ``alarms.every_n_steps`` would; the baselines
read every step's loss or gradient norm: Lightning's ``SpikeDetection`` (its defaults) and a 6σ
z-score over a 128-step window (as OLMo-core uses), on the loss and on the gradient norm.

``--tune`` runs the written procedure of ``docs/alarms.md``: every ``logit_growth`` setting of a grid
is scored on the round's tuning families only; the chosen one must have no ``critical`` firing on
their healthy runs and detect the most attention divergences before the spike (ties: the longest
median lead, then the fewest warnings on healthy runs); the table then reports the tuning families
and, apart, the held-out one (round 1: tune on ``copy`` and ``lm``, hold out ``seq2seq``; round 2:
tune on those three, hold out ``sort``; round 3: tune on those four, hold out ``recall``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnmonitor.alarms import AlarmsConfig, AttentionAlarms, LogitGrowthConfig

ROUNDS = {1: (("copy", "lm"), ("seq2seq",)), 2: (("copy", "lm", "seq2seq"), ("sort",)), 3: (("copy", "lm", "seq2seq", "sort"), ("recall",))}
"""``{round: (tuning families, held-out family)}``: the first round held ``seq2seq`` out; the second
tunes on it too and holds out ``sort``, a family added after the first round's results; the third
tunes on all four and holds out ``recall``, added after the second round's."""
SPIKE_FACTOR, SPIKE_RISE, SPIKE_AFTER = 2.0, 1.0, 50


@dataclass
class Run:
    """A recorded run and its label."""

    name: str
    family: str
    scenario: dict
    losses: list[float]
    grad_norms: list[float]
    layers: list[str]
    stats: dict[str, list]
    label: str = ""  # "attention", "elsewhere", "healthy", "degraded"
    spike: int | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def final_loss(self) -> float:
        tail = [x for x in self.losses[-50:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else math.inf


def first_spike(losses: list[float]) -> int | None:
    low = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss) or (step >= SPIKE_AFTER and loss > max(SPIKE_FACTOR * low, low + SPIKE_RISE)):
            return step
        low = min(low, loss)
    return None


def load(folder: Path, families: tuple[str, ...] | None = None) -> list[Run]:
    """The recorded runs of ``families`` (default: all), labelled."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        if "+qkclip" in path.name:
            continue
        trace = json.loads(path.read_text())
        s = trace["scenario"]
        if families is not None and s["family"] not in families:
            continue
        runs.append(Run(path.stem, s["family"], s, trace["losses"], trace["grad_norms"], trace["layers"], trace["stats"]))
    best = {}
    for run in runs:
        run.spike = first_spike(run.losses)
        if run.spike is None:
            best[run.family] = min(best.get(run.family, math.inf), run.final_loss)
    for run in runs:
        if run.spike is not None:
            run.label = "attention" if not run.scenario["qk_norm"] and run.scenario["head_lr"] == 1 else "elsewhere"
        else:
            healthy = run.final_loss <= best[run.family] + max(0.2 * best[run.family], 0.1)
            run.label = "healthy" if healthy else "degraded"
    return runs


# detectors: each returns the steps at which it fires ---------------------------------------------
@dataclass
class Detection:
    first: dict[str, int | None] = field(default_factory=dict)  # severity -> first step
    events: dict[str, int] = field(default_factory=dict)  # severity -> number of new episodes / detections


def replay_alarms(run: Run, config: AlarmsConfig, every: int) -> Detection:
    """The alarms' new firings (episodes started or escalated) by severity, looking every ``every`` steps."""
    alarms = AttentionAlarms(config)
    found = Detection()
    for step in range(every - 1, len(run.stats["max_logit"]), every):
        values = {s: torch.tensor(run.stats[s][step], dtype=torch.float32) for s in alarms.statistics}
        for firing in alarms.check(step, run.layers, values):
            if firing.new:
                found.first.setdefault(firing.severity, step)
                found.events[firing.severity] = found.events.get(firing.severity, 0) + 1
    return found


def lightning_spike_detection(values: list[float]) -> list[int]:
    """Steps at which Lightning's ``SpikeDetection`` (its defaults) raises, replayed without a Fabric:
    its own ``_is_spike`` and ``_update_stats``; training would stop at the first."""
    from lightning.fabric.utilities.spike import SpikeDetection

    detector, fired = SpikeDetection(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, value in enumerate(values):
            loss = torch.tensor(value)
            if step >= detector.warmup and detector._is_spike(loss):
                fired.append(step)
            elif math.isfinite(value):
                detector._update_stats(loss)
    return fired


def zscore(values: list[float], window: int = 128, sigmas: float = 6.0) -> list[int]:
    """Steps whose value exceeds the mean of the previous ``window`` values by ``sigmas`` standard
    deviations (or is not finite), once the window is full."""
    fired = []
    for step in range(window, len(values)):
        past = [v for v in values[step - window : step] if math.isfinite(v)]
        if not math.isfinite(values[step]) or (len(past) > 1 and values[step] > statistics.fmean(past) + sigmas * statistics.stdev(past)):
            fired.append(step)
    return fired


BASELINES: dict[str, Callable[[Run], list[int]]] = {
    "Lightning SpikeDetection (loss)": lambda r: lightning_spike_detection(r.losses),
    "z-score 6σ/128 (loss)": lambda r: zscore(r.losses),
    "z-score 6σ/128 (grad norm)": lambda r: zscore(r.grad_norms),
}


# scoring ---------------------------------------------------------------------------------------------
@dataclass
class Score:
    """A detector on a set of runs."""

    detected: int = 0
    diverged: int = 0
    leads: list[int] = field(default_factory=list)
    false_alarms: int = 0
    healthy_steps: int = 0
    healthy_runs_alarmed: int = 0
    healthy_runs: int = 0

    def cells(self) -> list[str]:
        lead = f"{statistics.median(self.leads):.0f} / {min(self.leads)}" if self.leads else "–"
        rate = 1000 * self.false_alarms / self.healthy_steps if self.healthy_steps else math.nan
        return [
            f"{self.detected}/{self.diverged}",
            lead,
            f"{rate:.2f}",
            f"{self.healthy_runs_alarmed}/{self.healthy_runs}",
        ]


def score(runs: Iterable[Run], first_and_count: Callable[[Run], tuple[int | None, int]], diverging: str = "attention") -> Score:
    """``first_and_count(run)``: the detector's first step and its number of events on the run."""
    result = Score()
    for run in runs:
        first, count = first_and_count(run)
        if run.label == diverging:
            result.diverged += 1
            if first is not None and first <= run.spike:
                result.detected += 1
                result.leads.append(run.spike - first)
        elif run.label == "healthy":
            result.healthy_runs += 1
            result.healthy_steps += run.steps
            result.false_alarms += count
            result.healthy_runs_alarmed += count > 0
    return result


def alarm_detector(
    config: AlarmsConfig, every: int, severities: tuple[str, ...], cache: dict[str, Detection] | None = None
) -> Callable[[Run], tuple[int | None, int]]:
    """The alarms as a detector of ``severities``; ``cache``: replays shared between detectors of one config."""
    cache = {} if cache is None else cache

    def detect(run: Run) -> tuple[int | None, int]:
        if run.name not in cache:
            cache[run.name] = replay_alarms(run, config, every)
        found = cache[run.name]
        firsts = [found.first[s] for s in severities if s in found.first]
        return (min(firsts) if firsts else None), sum(found.events.get(s, 0) for s in severities)

    return detect


def baseline_detector(fire: Callable[[Run], list[int]]) -> Callable[[Run], tuple[int | None, int]]:
    def detect(run: Run) -> tuple[int | None, int]:
        steps = fire(run)
        return (steps[0] if steps else None), len(steps)

    return detect


# the tuning procedure ----------------------------------------------------------------------------------
GRID = {
    "span": (50, 100),
    "factor": (1.5, 2.0, 3.0),
    "sustain": (1, 2, 3),
    "heads_fraction": (0.25, 0.5, 0.75),
    "from_below_floor": (False, True),
}
"""The ``logit_growth`` settings tried (``floor`` stays 20: e^-20 of the largest weight is a saturated softmax;
``from_below_floor`` was added in the third round)."""

_TUNING_RUNS: list[Run] = []


def _init_worker(folder: Path, tuning: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    _TUNING_RUNS.extend(load(folder, tuning))


def _evaluate(job: tuple[tuple, int]) -> tuple[tuple, Score, Score]:
    values, every = job
    config = AlarmsConfig(logit_growth=LogitGrowthConfig(**dict(zip(GRID, values, strict=True))), entropy_collapse=None, sink_jump=None)
    replays: dict[str, Detection] = {}
    critical = score(_TUNING_RUNS, alarm_detector(config, every, ("critical",), replays))
    warning = score(_TUNING_RUNS, alarm_detector(config, every, ("warning",), replays))
    return values, critical, warning


def tune(folder: Path, tuning: tuple[str, ...], every: int, workers: int) -> tuple[LogitGrowthConfig, list[str]]:
    """Choose ``logit_growth`` on the tuning families by the written procedure; returns it and a log line per setting."""
    import multiprocessing

    jobs = [(values, every) for values in itertools.product(*GRID.values())]
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (folder, tuning)) as pool:
        results = pool.map(_evaluate, jobs)
    log, best, best_key = [], None, None
    for values, critical, warning in results:
        lead = statistics.median(critical.leads) if critical.leads else -1
        setting = dict(zip(GRID, values, strict=True))
        log.append(
            f"{setting}: critical on healthy runs {critical.false_alarms}, detects {critical.detected}/{critical.diverged}, "
            f"median lead {lead}; warnings on healthy runs {warning.false_alarms}"
        )
        key = (critical.detected, lead, -warning.false_alarms)
        if critical.false_alarms == 0 and (best_key is None or key > best_key):
            best, best_key = setting, key
    if best is None:
        raise SystemExit("no setting of the grid is free of critical firings on the healthy tuning runs")
    return LogitGrowthConfig(**best), log


# tables -------------------------------------------------------------------------------------------------
HEADER = (
    "| detector | family | detected before the spike | median / min lead (steps) | false alarms per 1,000 healthy steps "
    "| healthy runs with any |"
)


def table(runs: list[Run], config: AlarmsConfig, every: int, tuning: tuple[str, ...], held_out: tuple[str, ...]) -> list[str]:
    replays: dict[str, Detection] = {}
    detectors = {
        "attnmonitor critical": alarm_detector(config, every, ("critical",), replays),
        "attnmonitor warning or critical": alarm_detector(config, every, ("warning", "critical"), replays),
        **{name: baseline_detector(fire) for name, fire in BASELINES.items()},
    }
    groups = {f"tuning ({', '.join(tuning)})": tuning, f"held out ({', '.join(held_out)})": held_out}
    rows = [HEADER, "|" + "---|" * 6]
    for name, detect in detectors.items():
        for group, families in groups.items():
            chosen = [r for r in runs if r.family in families]
            rows.append(f"| {name} | {group} | " + " | ".join(score(chosen, detect).cells()) + " |")
    rows += ["", "Runs that diverged elsewhere (output logits; qk-layernorm on):", "", HEADER, "|" + "---|" * 6]
    for name, detect in detectors.items():
        rows.append(f"| {name} | all | " + " | ".join(score(runs, detect, diverging="elsewhere").cells()) + " |")
    return rows


def runs_table(runs: list[Run], config: AlarmsConfig, every: int) -> list[str]:
    rows = ["| run | label | spike | first warning | first critical | warnings | criticals |", "|" + "---|" * 7]
    for run in runs:
        found = replay_alarms(run, config, every)
        rows.append(
            f"| {run.name} | {run.label} | {run.spike if run.spike is not None else '–'} | {found.first.get('warning', '–')} | "
            f"{found.first.get('critical', '–')} | {found.events.get('warning', 0)} | {found.events.get('critical', 0)} |"
        )
    return rows


def draw(runs: list[Run], config: AlarmsConfig, every: int, path: Path, held_out: tuple[str, ...]) -> None:
    """Loss and largest ``max_logit`` of a held-out diverging run and a held-out healthy one, with the
    first critical alarm and the baselines' first detections marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diverging = next(r for r in runs if r.family in held_out and r.label == "attention")
    healthy = next(r for r in runs if r.family in held_out and r.label == "healthy" and not r.scenario["qk_norm"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 5.5), sharex="col")
    for column, run in enumerate((diverging, healthy)):
        found = replay_alarms(run, config, every)
        largest = [max((v for row in step for v in row if v == v), default=math.nan) for step in run.stats["max_logit"]]
        axes[0, column].plot(run.losses, lw=0.7)
        axes[0, column].set(ylabel="training loss", yscale="log", title=f"{run.name} ({run.label})")
        axes[1, column].plot(largest, lw=0.9, color="tab:purple")
        axes[1, column].set(ylabel="largest max_logit", yscale="log", xlabel="optimizer step")
        marks = [("critical alarm", found.first.get("critical"), "tab:red", "--")]
        marks += [
            (name, (BASELINES[name](run) or [None])[0], color, ":")
            for name, color in zip(BASELINES, ("tab:orange", "tab:green", "tab:brown"), strict=False)
        ]
        if run.spike is not None:
            marks.append(("loss spike", run.spike, "black", "-"))
        for ax in axes[:, column]:
            for label, step, color, style in marks:
                if step is not None:
                    ax.axvline(step, color=color, ls=style, lw=1.2, label=f"{label} ({step})")
        axes[0, column].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def qk_clip_table(folder: Path, suite: list[Run]) -> list[str]:
    """Per peak learning rate of the recorded QK-clip runs (``health_suite_record.py --qk-clip``): runs
    that spiked and final losses without QK-clip, with it, and with it and the AdamW moments of the
    clipped rows rescaled, against the same seed's stable run (the family's lowest learning rate)."""
    runs: dict[tuple[str, float, str], list[tuple[int, Run]]] = {}
    for path in sorted(folder.glob("*.json")):
        trace = json.loads(path.read_text())
        s = trace["scenario"]
        variant = "qk_clip + moments" if path.stem.endswith("+moments") else "qk_clip" if "+qkclip" in path.stem else "none"
        run = Run(path.stem, s["family"], s, trace["losses"], trace["grad_norms"], trace["layers"], trace["stats"])
        run.spike = first_spike(run.losses)
        runs.setdefault((s["family"], s["lr"], variant), []).append((s["seed"], run))
    for run in suite:  # the suite's own runs without QK-clip
        s = run.scenario
        if not s["qk_norm"] and s["head_lr"] == 1:
            runs.setdefault((run.family, s["lr"], "none"), []).append((s["seed"], run))
    rows = ["| family | peak lr | QK-clip | loss spikes | final loss per seed | vs the stable run (lowest lr) |", "|" + "---|" * 6]
    families = sorted({f for f, _, v in runs if v != "none"})
    for family in families:
        lrs = sorted(lr for f, lr, _ in runs if f == family)
        stable = dict(runs[(family, lrs[0], "none")])
        for lr in sorted(set(lrs)):
            for variant in ("none", "qk_clip", "qk_clip + moments"):
                seeds = sorted(runs.get((family, lr, variant), []), key=lambda x: x[0])
                if not seeds:
                    continue
                spikes = sum(r.spike is not None for _, r in seeds)
                finals = " / ".join(f"{r.final_loss:.3g}" for _, r in seeds)
                ratio = " / ".join(f"{r.final_loss / stable[seed].final_loss:.2f}x" if seed in stable else "–" for seed, r in seeds)
                rows.append(f"| {family} | {lr:g} | {variant} | {spikes}/{len(seeds)} | {finals} | {ratio} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, default=Path("outputs/health_suite"))
    parser.add_argument("--every", type=int, default=10, help="alarms.every_n_steps of the replay")
    parser.add_argument("--tune", action="store_true", help="choose logit_growth by the procedure instead of the defaults")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--qk-clip-traces", type=Path, default=None, help="also tabulate the QK-clip runs recorded here")
    parser.add_argument("--workers", type=int, default=2, help="processes of the --tune search")
    parser.add_argument("--tuning-log", type=Path, default=None, help="with --tune: write every setting's scores here")
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), default=3, help="which families tune and which is held out")
    args = parser.parse_args()
    tuning, held_out = ROUNDS[args.round]
    runs = load(args.traces, tuning + held_out)
    labels = {label: sum(r.label == label for r in runs) for label in ("attention", "elsewhere", "healthy", "degraded")}
    print(f"{len(runs)} runs: {labels}")
    config = AlarmsConfig()
    out = []
    if args.tune:
        rule, log = tune(args.traces, tuning, args.every, args.workers)
        if args.tuning_log is not None:
            args.tuning_log.write_text("\n".join(log) + "\n")
        print(f"chosen: {rule}")
        config = AlarmsConfig(logit_growth=rule)
    else:
        print(f"defaults: {config.logit_growth}")
    out += table(runs, config, args.every, tuning, held_out) + ["", *runs_table(runs, config, args.every)]
    if args.qk_clip_traces is not None:
        out += ["", *qk_clip_table(args.qk_clip_traces, runs)]
    print("\n".join(out))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(out) + "\n")
    if args.figure is not None:
        draw(runs, config, args.every, args.figure, held_out)


if __name__ == "__main__":
    main()
