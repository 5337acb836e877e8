"""Figures where people log: the same images, tables and histograms that TensorBoard gets reach real
W&B (offline runs, read back from their log file), MLflow (a local store, read back through its
client) and CSV folders, from Lightning, Hugging Face and the plain loop."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import AttentionMonitor
from attnmonitor.demo import TinyGPT
from attnmonitor.integrations.loop import AttentionMonitorLoop
from attnmonitor.loggers import CSVWriter
from tests.helpers.events import read_events
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer
from tests.helpers.wandb_log import read_history

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

pytestmark = [ignore_few_batches, ignore_no_validation_data, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
VOCAB, SEQ, FIGURE_STEP = 40, 12, 3


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline and silent; MLflow's local file store allowed (it is in maintenance mode)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _loader() -> DataLoader:
    ids = torch.randint(VOCAB, (16, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)


def _monitor() -> AttentionMonitor:
    return AttentionMonitor(
        capture={"statistics": ["normalized_entropy", "max_logit"]},
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 4, "val_batches": 0},
        dashboards={"heatmaps": {"every_n_steps": 4}, "analyses": False},
    )


def _pixels(data: bytes | Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


def _tensorboard_figures(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, float]]:
    """Images, texts and histogram counts TensorBoard holds at ``FIGURE_STEP``."""
    events = read_events(path)
    images = {
        tag: _pixels(next(e for e in events.Images(tag) if e.step == FIGURE_STEP).encoded_image_string) for tag in events.Tags()["images"]
    }
    texts = {  # add_text appends /text_summary to the tag
        tag.removesuffix("/text_summary"): next(e for e in events.Tensors(tag) if e.step == FIGURE_STEP).tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
        if tag.startswith("attn_train") and any(e.step == FIGURE_STEP for e in events.Tensors(tag))
    }
    counts = {
        tag: next(e for e in events.Histograms(tag) if e.step == FIGURE_STEP).histogram_value.num for tag in events.Tags()["histograms"]
    }
    return images, texts, counts


def test_lightning_figures_reach_wandb_mlflow_and_csv_as_they_reach_tensorboard(tmp_path, offline):
    loggers = [
        TensorBoardLogger(tmp_path, name="tb", version=0),
        CSVLogger(tmp_path, name="csv", version=0),
        WandbLogger(save_dir=str(tmp_path), project="attnmonitor-test", offline=True),
        MLFlowLogger(experiment_name="attnmonitor-test", tracking_uri=f"file:{tmp_path / 'mlruns'}"),
    ]
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)
    make_trainer(tmp_path, [_monitor()], max_steps=4, logger=loggers, limit_val_batches=0).fit(model, train_dataloaders=_loader())
    run_dir = Path(loggers[2].experiment.dir).parent
    loggers[2].experiment.finish()

    images, texts, counts = _tensorboard_figures(tmp_path / "tb" / "version_0")
    assert {"attn_train/atlas/max_logit", "attn_train_heatmap/blocks.0.attn/head_0"} <= set(images) and texts and counts

    # CSV: one PNG / Markdown file per tag and step, histogram rows
    folder = tmp_path / "csv" / "version_0"
    for tag, pixels in images.items():
        np.testing.assert_array_equal(_pixels(folder / "images" / tag / f"step_{FIGURE_STEP}.png"), pixels, err_msg=tag)
    for tag, text in texts.items():
        assert (folder / "text" / tag / f"step_{FIGURE_STEP}.md").read_text() == text
    rows = list(csv.DictReader((folder / "histograms.csv").open()))
    assert {(r["tag"], len(r["values"].split())) for r in rows if r["step"] == str(FIGURE_STEP)} == {(t, int(n)) for t, n in counts.items()}
    assert "attn_train/max_logit" in (folder / "metrics.csv").read_text().splitlines()[0].split(",")  # CSVLogger's own scalars

    # W&B: every figure in the run's history at the trainer's step, the media file holding the same pixels
    history = read_history(run_dir)
    at_step = [row for row in history if row.get("trainer/global_step") == FIGURE_STEP]
    for tag, pixels in images.items():
        (row,) = [r for r in at_step if f"{tag}/path" in r]
        assert row[f"{tag}/_type"] == "image-file"
        np.testing.assert_array_equal(_pixels(run_dir / "files" / row[f"{tag}/path"]), pixels, err_msg=tag)
    for tag in counts:
        (row,) = [r for r in at_step if f"{tag}/_type" in r]
        assert row[f"{tag}/_type"] == "histogram" and sum(row[f"{tag}/values"]) == counts[tag]
    for tag, text in texts.items():  # tables sortable, numbers as numbers; the whole text as HTML beside
        (row,) = [r for r in at_step if f"{tag}/_type" in r]
        assert row[f"{tag}/_type"] == "table-file" and row[f"{tag}/text/_type"] == "html-file", tag
        logged = json.loads((run_dir / "files" / row[f"{tag}/path"]).read_text())
        lines = [line for line in text.splitlines() if line.startswith("|")]
        assert logged["columns"] == [c.strip() for c in lines[0].strip("|").split("|")]
        assert len(logged["data"]) == len(lines) - 2
    table = json.loads((run_dir / "files" / next(r for r in at_step if "attn_train/table/path" in r)["attn_train/table/path"]).read_text())
    layer, head, value = table["data"][1][:3]  # second row: layer 0, head 1, its first statistic as a number
    assert (layer, head) == ("blocks.0.attn", 1) and isinstance(value, float)
    assert any("attn_train/normalized_entropy" in r for r in history)  # WandbLogger's own scalars

    # MLflow: images with their step (the UI's slider), tables and histograms as artifacts
    client, run_id = loggers[3].experiment, loggers[3].run_id
    logged = [a.path for a in client.list_artifacts(run_id, "images")]
    download = Path(client.download_artifacts(run_id, "", str(tmp_path / "mlflow-copy")))
    for tag, pixels in images.items():
        (name,) = [p for p in logged if p.startswith(f"images/{tag.replace('/', '~')}+step+{FIGURE_STEP}+") and p.endswith(".png")]
        np.testing.assert_array_equal(_pixels(download / name), pixels, err_msg=tag)
    for tag, text in texts.items():
        assert (download / "attnmonitor" / tag / f"step_{FIGURE_STEP}.md").read_text() == text
    for tag, count in counts.items():
        assert len(json.loads((download / "attnmonitor" / tag / f"step_{FIGURE_STEP}.json").read_text())["values"]) == count
    assert client.get_metric_history(run_id, "attn_train/normalized_entropy")  # MLFlowLogger's own scalars


class MetricsOnly(Logger):
    """A logger that takes scalars and nothing else."""

    name, version, experiment = "metrics", 0, None

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def log_metrics(self, metrics, step=None) -> None:
        self.keys |= set(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_a_logger_without_figures_gets_scalars_and_one_warning(tmp_path):
    monitor = AttentionMonitor(
        capture={"statistics": ["entropy"]}, schedule={"every_n_steps": 1, "val_batches": 0, "atlas_every_n_steps": 1}
    )
    logger = MetricsOnly()
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)
    with pytest.warns(RuntimeWarning, match=r"images skipped: none of the trainer's loggers \['MetricsOnly'\] takes figures") as record:
        make_trainer(tmp_path, [monitor], max_steps=3, logger=logger, limit_val_batches=0).fit(model, train_dataloaders=_loader())
    assert sum("images skipped" in str(w.message) for w in record) == 1
    assert {"attn_train/entropy", "attn_train_layers/entropy/blocks.1.attn"} <= logger.keys


def test_plain_loop_writes_scalars_and_figures_to_a_csv_writer(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = CSVWriter(tmp_path / "run")
    returned = {}
    with AttentionMonitorLoop(
        model, capture={"statistics": ["entropy"]}, schedule={"every_n_steps": 2, "atlas_every_n_steps": 2}
    ) as monitor:
        for step, (ids, targets) in enumerate(_loader()):
            with monitor.step(step):
                loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            returned.update({(step, tag): value for tag, value in monitor.log(writer).items()})
    rows = list(csv.DictReader((tmp_path / "run" / "scalars.csv").open()))
    assert returned and {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows} == pytest.approx(returned)
    assert sorted(p.name for p in (tmp_path / "run" / "images" / "attn_train" / "atlas" / "entropy").iterdir()) == [
        "step_1.png",
        "step_3.png",
    ]


def test_hugging_face_trainer_figures_reach_wandb_and_mlflow(tmp_path, offline, monkeypatch):
    pytest.importorskip("accelerate")
    from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer
    from tests.helpers.hf_trainer import arguments, build, samples

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "attnmonitor-hf")
    monitor = AttentionMonitorCallback(
        capture={"statistics": ["normalized_entropy"]},
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 2, "val_batches": 0},
        dashboards={"heatmaps": None, "analyses": False},
    )
    args = arguments(tmp_path / "out", max_steps=2, report_to=["wandb", "mlflow"])
    trainer = AttentionMonitorTrainer(model=build("gpt2"), args=args, train_dataset=samples("gpt2", 6), callbacks=[monitor])
    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()

    # the atlas at the Trainer's step 2 (its steps count from 1), under its own step metric
    rows = [r for r in read_history(run_dir) if r.get("attn_train/atlas/normalized_entropy/_type") == "image-file"]
    assert [r["train/global_step"] for r in rows] == [2]
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("attnmonitor-hf").experiment_id])
    names = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(n.startswith("images/attn_train~atlas~normalized_entropy+step+2+") and n.endswith(".png") for n in names), names
    assert client.list_artifacts(run.info.run_id, "attnmonitor/attn_train/table")  # the per-head table


MAIN_JOB = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.num_sanity_val_steps=0",
    "callbacks.attention_monitor.schedule.every_n_steps=2",
    "callbacks.attention_monitor.schedule.atlas_every_n_steps=2",
    "callbacks.attention_monitor.dashboards.heatmaps.every_n_steps=2",
]
FIGURES = ["attn_train/atlas/normalized_entropy", "attn_train_heatmap/blocks.0.attn/head_0"]  # logged at step 1 (0-based 1: the 2nd)


def _main_job(tmp_path: Path, logger: str) -> tuple[Path, str]:
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "attnmonitor.train", f"logger={logger}", f"hydra.run.dir={tmp_path}/run", *MAIN_JOB]
    result = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "attnmonitor: drawing the figures" not in result.stdout  # every figure reached the logger
    return tmp_path / "run", result.stdout


@pytest.mark.slow
def test_main_job_logs_scalars_atlases_heatmaps_and_table_to_csv(tmp_path):
    run, output = _main_job(tmp_path, "csv")
    folder = run / "csv"
    assert f"CSV logs: {folder}" in output
    assert "attn_train/normalized_entropy" in (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    for tag in FIGURES:
        assert _pixels(folder / "images" / tag / "step_1.png").shape[0] > 100, tag
    assert (folder / "text" / "attn_train" / "table" / "step_1.md").read_text().startswith("| layer | head |")


@pytest.mark.slow
def test_main_job_logs_scalars_atlases_heatmaps_and_table_to_wandb_offline(tmp_path):
    run, output = _main_job(tmp_path, "wandb")
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    assert f"wandb sync {run_dir}" in output  # how to upload it, printed
    history = read_history(run_dir)
    assert any("attn_train/normalized_entropy" in row for row in history)
    at_step = [row for row in history if row.get("trainer/global_step") == 1]
    for tag in FIGURES:
        (row,) = [r for r in at_step if f"{tag}/path" in r]
        assert _pixels(run_dir / "files" / row[f"{tag}/path"]).shape[0] > 100, tag
    assert any(r.get("attn_train/table/_type") == "table-file" for r in at_step)


@pytest.mark.slow
def test_main_job_logs_scalars_atlases_heatmaps_and_table_to_a_local_mlflow_store(tmp_path, monkeypatch):
    run, output = _main_job(tmp_path, "mlflow")
    uri = f"file:{run}/mlruns"
    assert f"mlflow ui --backend-store-uri {uri}" in output
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("attnmonitor").experiment_id])
    run_id = found.info.run_id
    assert client.get_metric_history(run_id, "attn_train/normalized_entropy")
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for tag in FIGURES:
        assert any(p.startswith(f"images/{tag.replace('/', '~')}+step+1+") and p.endswith(".png") for p in images), (tag, images)
    table = Path(client.download_artifacts(run_id, "attnmonitor/attn_train/table/step_1.md", str(tmp_path / "copy")))
    assert table.read_text().startswith("| layer | head |")
