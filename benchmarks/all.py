"""Run every benchmark and print one table of ratios with targets and PASS/FAIL.

    python benchmarks/all.py

Each benchmark runs in its own process (see its file for what it measures); this collects the lines
that state a ratio and its target. Takes about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["import_time.py", "statistics_kernel.py", "throughput.py", "long_sequence.py", "regularizer.py", "flex.py"]


def main() -> None:
    failed = False
    report = []
    for script in SCRIPTS:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, cwd=HERE)
        lines = result.stdout.strip().splitlines()
        summary = lines[lines.index("") + 1 :] if "" in lines else lines[-6:]
        report.append(f"== {script} ({time.perf_counter() - start:.0f} s)")
        report.extend(summary if result.returncode == 0 else [f"ERROR (exit {result.returncode}): {result.stderr[-500:]}"])
        failed |= result.returncode != 0 or any("FAIL" in line for line in summary)
    print("\n".join(report))
    print("\nALL PASS" if not failed else "\nSOME FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
