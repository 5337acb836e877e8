"""Train a small GPT on the prose of Python's documentation with the attention monitor on.

    python examples/train_tiny_gpt.py [--max-steps 800] [--log-dir runs]

The main job (``attnmonitor-train``) without Hydra: it prints where its TensorBoard logs are before
the first step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from attnmonitor import AttentionMonitor
from attnmonitor.demo import CorpusDataModule, TinyGPT
from attnmonitor.integrations.lightning import AttentionProgressBar
from attnmonitor.train import quiet


def main() -> None:
    """Train for ``--max-steps`` with the monitor; logs under ``--log-dir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--log-dir", default="runs")
    args = parser.parse_args()

    quiet()  # Lightning's tips and known harmless warnings off; the monitor's own messages stay
    L.seed_everything(0, verbose=False)
    data = CorpusDataModule(seq_len=64, batch_size=8)
    model = TinyGPT(vocab_size=data.vocab_size, seq_len=64, dropout=0.2)
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 50, "atlas_every_n_steps": 200},
        dashboards={"heatmaps": {"every_n_steps": 200}, "tokenizer": data.decode},
    )
    logger = TensorBoardLogger(args.log_dir, name="tiny_gpt")
    print(f"TensorBoard logs: {Path(logger.log_dir).resolve()}\nView them with:   tensorboard --logdir {args.log_dir}\n", flush=True)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        val_check_interval=200,
        check_val_every_n_epoch=None,
        callbacks=[monitor, AttentionProgressBar()],
        logger=logger,
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main()
