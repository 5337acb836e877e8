"""Screenshots of TensorBoard's (and the MLflow UI's) pages for a run, rendered by headless Chromium.

    python docs/screenshots.py LOGDIR [--out LOGDIR/screenshots]
    python docs/screenshots.py --mlflow STORE --mlflow-python PYTHON [--out DIR]

Starts ``tensorboard --logdir LOGDIR`` on a free loopback port (``--samples_per_plugin images=100``),
then for each page (Time Series, Scalars, Custom Scalars, Images, the heatmaps, Text, HParams) asks
Debian's ``chromium`` (``apt-get install chromium``) for a 1600x1000 screenshot, written to
``OUT/tensorboard-<page>.png`` (by default next to the run, so that the README's committed
screenshots change only when ``--out docs`` is asked for). With ``--mlflow``, the MLflow UI
(``PYTHON -m mlflow ui``: the full ``mlflow`` package, not the ``mlflow-skinny`` client the extra
installs) serving the local store ``STORE`` instead: the run's metrics and its per-head table (an
artifact), as ``mlflow-<page>.png``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

TENSORBOARD_PAGES = {
    "time-series": "#timeseries",
    "scalars": "#scalars",
    "custom-scalars": "#custom_scalars",
    "images": "#images",
    "heatmaps": "#images&tagFilter=heatmap",
    "text": "#text&tagFilter=table",
    "interpretation": "#text&tagFilter=interpretation",
    "hparams": "#hparams",
}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1000",
    "--virtual-time-budget=40000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command: list[str], port: int, ready: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a server on the loopback port and wait until ``ready`` (a path) answers."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(90):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=2)  # loopback only
            break
        except OSError:
            time.sleep(1)
    time.sleep(5)  # let it load the run
    return server


def _screenshot(url: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        command = ["chromium", *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    print(out)


def _mlflow_pages(store: str) -> dict[str, str]:
    """The run's pages (the store's first experiment and run that has images)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            base = f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
            return {"metrics": f"{base}/model-metrics", "table": f"{base}/artifacts/attnmonitor/attn_train/table/step_799.md"}
    raise SystemExit(f"no run in {store}")


def main() -> None:
    """Screenshot every page of a TensorBoard serving ``LOGDIR`` (or of the MLflow UI serving ``--mlflow``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", nargs="?")
    parser.add_argument("--out", default=None, help="default: LOGDIR/screenshots (or next to the store); the README's: docs")
    parser.add_argument("--mlflow", default=None, help="a local MLflow store (file:PATH) to show in the MLflow UI")
    parser.add_argument("--mlflow-python", default=sys.executable, help="a Python with the full mlflow package")
    args = parser.parse_args()
    if (args.logdir is None) == (args.mlflow is None):
        parser.error("give LOGDIR or --mlflow STORE")
    where = Path(args.logdir) if args.logdir else Path(args.mlflow.removeprefix("file:")).parent
    out = Path(args.out or where / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    if args.mlflow:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps local file stores behind this flag
        command = [args.mlflow_python, "-m", "mlflow", "ui", "--backend-store-uri", args.mlflow, "--host", "127.0.0.1", "--port", str(port)]
        pages, prefix, ready = _mlflow_pages(args.mlflow), "mlflow", "/health"
    else:
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--samples_per_plugin", "images=100"]
        pages, prefix, ready = TENSORBOARD_PAGES, "tensorboard", "/data/runs"
    server = _serve(command, port, ready, env=dict(os.environ))
    try:
        for name, page in pages.items():
            _screenshot(f"http://127.0.0.1:{port}/{page}", out / f"{prefix}-{name}.png")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
