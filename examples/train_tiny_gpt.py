"""Train a small GPT on the prose of Python's documentation with the attention monitor on.

    python examples/train_tiny_gpt.py [--max-steps 600] [--log-dir runs]

Then: tensorboard --logdir runs
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from attnmonitor import AttentionMonitor, HeatmapConfig
from attnmonitor.demo import CorpusDataModule, TinyGPT


def main() -> None:
    """Train for ``--max-steps`` with the monitor; logs under ``--log-dir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--log-dir", default="runs")
    args = parser.parse_args()

    L.seed_everything(0)
    data = CorpusDataModule(seq_len=64, batch_size=32)
    model = TinyGPT(vocab_size=len(data.vocab), seq_len=64)
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 50}, dashboards={"heatmaps": HeatmapConfig(every_n_steps=200, max_tokens=32), "tokenizer": data.vocab}
    )
    logger = TensorBoardLogger(args.log_dir, name="tiny_gpt")
    trainer = L.Trainer(
        max_steps=args.max_steps,
        val_check_interval=200,
        check_val_every_n_epoch=None,
        callbacks=[monitor],
        logger=logger,
        log_every_n_steps=25,
    )
    trainer.fit(model, datamodule=data)
    print(f"TensorBoard logs in {logger.log_dir}\nView them with:  tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
