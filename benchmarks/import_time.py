"""Import cost of the plain-PyTorch entry point, ``from attnmonitor import AttentionCapture``, over ``import torch``.

    python benchmarks/import_time.py [--repeats 5]

Each measurement is a fresh interpreter: ``import torch`` is timed, then the attnmonitor import on
top of it; the median over repeats is reported, with the heavy modules the import pulled in (none
of Lightning, matplotlib, TensorBoard, transformers should appear).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
start = time.perf_counter(); import torch; torch_s = time.perf_counter() - start
start = time.perf_counter(); from attnmonitor import AttentionCapture; ours = time.perf_counter() - start
heavy = [m for m in ("lightning", "matplotlib", "tensorboard", "transformers", "hydra") if m in sys.modules]
print(json.dumps({"torch": torch_s, "attnmonitor": ours, "heavy": heavy}))
"""
TARGET_S = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    command = [sys.executable, "-c", PROBE]
    runs = [json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout) for _ in range(args.repeats)]
    torch_s = statistics.median(r["torch"] for r in runs)
    ours = statistics.median(r["attnmonitor"] for r in runs)
    heavy = sorted({m for r in runs for m in r["heavy"]})
    print(f"import torch: {torch_s:.3f} s; heavy modules imported by attnmonitor: {heavy or 'none'}")
    print("")
    verdict = "PASS" if ours <= TARGET_S and not heavy else "FAIL"
    print(f"import AttentionCapture over import torch: {ours:.3f} s (target <= {TARGET_S} s) {verdict}")


if __name__ == "__main__":
    main()
