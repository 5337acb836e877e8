"""The main job: a Hydra app training a model with the attention monitor on, logging to TensorBoard
(``logger=wandb``, ``logger=mlflow``, ``logger=csv``: to those instead).

    attnmonitor-train [overrides...]        (or: python -m attnmonitor.train [overrides...])

Configuration: ``attnmonitor/configs/train.yaml`` and its groups (model, data, trainer, logger,
callbacks, experiment).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attnmonitor.alarms.report import logger
from attnmonitor.config import register_configs
from attnmonitor.integrations.lightning import AttentionMonitor, AttentionProgressBar

register_configs()

QUIET = (
    ("ignore", r".*LeafSpec.*is deprecated", FutureWarning),  # lightning's pytree shim on recent torch
    ("ignore", r".*does not have many workers.*", UserWarning),  # the embedded data sets are tiny and in memory
    ("ignore", r"The number of training batches .* is smaller than the logging interval", UserWarning),
)
"""Known, harmless warnings the main job does not print."""


def quiet() -> None:
    """Silence Lightning's tips and the known harmless warnings (the job's own messages stay)."""
    for action, message, category in QUIET:
        warnings.filterwarnings(action, message=message, category=category)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "Tip:" not in record.getMessage())
    logger(console=True)  # alarm lines above the progress bar


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate the data, model, callbacks, logger and trainer of a composed config."""
    datamodule = instantiate(cfg.data)
    extra = {"vocab_size": datamodule.vocab_size} if OmegaConf.is_missing(cfg.model, "vocab_size") else {}
    model = instantiate(cfg.model, **extra)
    callbacks = [instantiate(node, _convert_="all") for node in cfg.get("callbacks", {}).values()]
    for callback in callbacks:
        if isinstance(callback, AttentionMonitor) and callback.options.dashboards.tokenizer is None and hasattr(datamodule, "decode"):
            callback.options.dashboards.tokenizer = datamodule.decode
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(AttentionProgressBar())
    if str(cfg.get("logger", {}).get("tracking_uri", "")).startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps local file stores behind this flag
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the HParams tab tells runs apart
    return model, datamodule, trainer


def run(cfg: DictConfig) -> L.Trainer:
    """Train as configured; prints where the logs are and how to view them, before the first step and at the end."""
    quiet()
    L.seed_everything(cfg.seed, verbose=False)
    model, datamodule, trainer = build(cfg)
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, AttentionMonitor):
            callback.engine.check(model)  # options that need the model fail here, before Lightning starts
    where = _where(trainer)
    if where:
        print(where, flush=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if where:
        print(where, flush=True)
    last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback is not None else ""
    if last:
        print(f"Resume with:      attnmonitor-train ckpt_path={Path(last).resolve()} trainer.max_steps=<more>\n", flush=True)
    return trainer


def _where(trainer: L.Trainer) -> str | None:
    """Where each logger of the run writes, and how to look."""
    lines = [_viewing(each, trainer) for each in trainer.loggers]
    return "\n" + "\n".join(line for line in lines if line) + "\n" if any(lines) else None


def _viewing(each: Any, trainer: L.Trainer) -> str | None:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(each, TensorBoardLogger):
        log_dir = Path(each.log_dir).resolve()
        keep = _images_per_tag(trainer)
        flag = f" --samples_per_plugin images={keep}" if keep else ""
        return f"TensorBoard logs: {log_dir}\nView them with:   tensorboard --logdir {log_dir.parent}{flag}"
    if isinstance(each, WandbLogger):
        run_dir = Path(each.experiment.dir).resolve().parent
        if each._offline:
            return f"W&B offline run: {run_dir}\nUpload it with:  wandb sync {run_dir}"
        return f"W&B run: {each.experiment.url}"
    if isinstance(each, MLFlowLogger):
        uri = each._tracking_uri
        return f"MLflow run {each.run_id} in {uri}\nView it with:    mlflow ui --backend-store-uri {uri}   (pip install mlflow)"
    if isinstance(each, CSVLogger):
        return f"CSV logs: {Path(each.log_dir).resolve()} (metrics.csv; figures under images/, tables under text/)"
    return None


def _images_per_tag(trainer: L.Trainer) -> int | None:
    """An upper bound of the images the run writes under one tag (training atlases and heatmaps, and
    validations), at least TensorBoard's default of 10, so that its reservoir keeps every one
    (``images=0`` would show none: tensorboard#5550); None for a run without ``max_steps``."""
    steps = trainer.max_steps
    if steps is None or steps < 0:
        return None
    intervals = [
        interval
        for callback in trainer.callbacks  # type: ignore[attr-defined]
        if isinstance(callback, AttentionMonitor)
        for interval in (
            callback.options.schedule.atlas_every_n_steps,
            callback.options.dashboards.heatmaps.every_n_steps if callback.options.dashboards.heatmaps is not None else None,
        )
        if interval
    ]
    validations = steps // trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else 0
    return max(10, steps // min(intervals, default=steps + 1) + validations + 1)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> Any:
    """The ``attnmonitor-train`` entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
