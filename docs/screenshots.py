"""Screenshots of TensorBoard's pages for a run, rendered by headless Chromium (for the README).

    python docs/screenshots.py LOGDIR [--out LOGDIR/screenshots]

Starts ``tensorboard --logdir LOGDIR`` on a free loopback port, then for each page (Scalars, Custom
Scalars, Images, Text, HParams) asks Debian's ``chromium`` (``apt-get install chromium``) for a
screenshot, written to ``OUT/tensorboard-<page>.png`` (by default next to the run, so that the
README's committed screenshots change only when ``--out docs`` is asked for).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {"scalars": "scalars", "custom-scalars": "custom_scalars", "images": "images", "text": "text", "hparams": "hparams"}
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
    "--virtual-time-budget=15000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Screenshot every page of a TensorBoard serving ``LOGDIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("--out", default=None, help="default: LOGDIR/screenshots; the README's: docs")
    args = parser.parse_args()
    args.out = args.out or str(Path(args.logdir) / "screenshots")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(60):  # wait for the server
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2)  # loopback only
                break
            except OSError:
                time.sleep(1)
        time.sleep(5)  # let it load the event files
        for name, page in PAGES.items():
            out = Path(args.out) / f"tensorboard-{name}.png"
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    ["chromium", *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", f"http://127.0.0.1:{port}/#{page}"],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
            print(out)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
