"""Record the health suite's runs (see ``health_scenarios.py``) as JSON traces, in parallel.

    python benchmarks/health_suite_record.py [--out outputs/health_suite] [--workers 2] [--seeds 0 1 2]
        every run of the suite (``health_scenarios.suite``)
    python benchmarks/health_suite_record.py --families copy --lrs 0.1 0.3 [--qk-norm on] [--head-lr 30] [--qk-clip 100]
        chosen runs

A trace already in ``--out`` is not recorded again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from health_scenarios import FAMILIES, Scenario, record, suite


def trace_path(out: Path, scenario: Scenario, clipped: float | None = None, moments: bool = False) -> Path:
    suffix = (f"+qkclip{clipped:g}" if clipped is not None else "") + ("+moments" if moments else "")
    return out / (scenario.name.replace("/", "_") + suffix + ".json")


def _run(job: tuple[Scenario, Path, float | None, bool]) -> str:
    scenario, path, tau, moments = job
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    trace = record(scenario, qk_clip={"tau": tau} if tau is not None else None, rescale_moments=moments)
    path.write_text(json.dumps(asdict(trace)))
    final = sum(trace.losses[-20:]) / len(trace.losses[-20:])
    return f"{path.name}: {trace.seconds:.0f} s, final loss {final:.3g}"


def record_all(scenarios: list[Scenario], out: Path, workers: int, tau: float | None = None, moments: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(s, trace_path(out, s, tau, moments), tau, moments) for s in scenarios if not trace_path(out, s, tau, moments).exists()]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for line in pool.imap_unordered(_run, jobs):
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/health_suite"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="default: the whole suite")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--qk-norm", choices=["off", "on", "both"], default="both")
    parser.add_argument("--head-lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--qk-clip", type=float, default=None, help="record with QK-clip at this tau")
    parser.add_argument("--moments", action="store_true", help="with --qk-clip: also rescale the AdamW moments of clipped rows")
    args = parser.parse_args()
    norms = {"off": [False], "on": [True], "both": [False, True]}[args.qk_norm]
    if args.lrs is None:
        scenarios = suite(tuple(args.seeds))
    else:
        scenarios = [
            Scenario(family, lr, seed, qk_norm, args.head_lr, args.steps, warmup=300)
            for family, lr, seed, qk_norm in itertools.product(args.families, args.lrs, args.seeds, norms)
        ]
    record_all(scenarios, args.out, args.workers, args.qk_clip, args.moments)


if __name__ == "__main__":
    main()
