"""The main job: a Hydra app training a model with the attention monitor on, logging to TensorBoard.

    attnmonitor-train [overrides...]        (or: python -m attnmonitor.train [overrides...])

Configuration: ``attnmonitor/configs/train.yaml`` and its groups (model, data, trainer, logger,
callbacks, experiment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attnmonitor.callback import AttentionMonitor
from attnmonitor.config import register_configs

register_configs()


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate the data, model, callbacks, logger and trainer of a composed config."""
    datamodule = instantiate(cfg.data)
    extra = {"vocab_size": datamodule.vocab_size} if OmegaConf.is_missing(cfg.model, "vocab_size") else {}
    model = instantiate(cfg.model, **extra)
    callbacks = [instantiate(node, _convert_="all") for node in cfg.get("callbacks", {}).values()]
    for callback in callbacks:
        if isinstance(callback, AttentionMonitor) and callback.decoder is None and hasattr(datamodule, "decode"):
            callback.decoder = datamodule.decode
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    return model, datamodule, trainer


def run(cfg: DictConfig) -> L.Trainer:
    """Train as configured; prints where the TensorBoard logs are."""
    L.seed_everything(cfg.seed)
    model, datamodule, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    if trainer.logger is not None and trainer.logger.log_dir:
        log_dir = Path(trainer.logger.log_dir).resolve()
        print(f"\nTensorBoard logs: {log_dir}\nView them with:   tensorboard --logdir {log_dir.parent}")
    return trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> Any:
    run(cfg)


if __name__ == "__main__":
    main()
