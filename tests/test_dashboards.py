"""What a researcher sees in TensorBoard: tag groups, the custom-scalar layout, legible heatmaps,
fixed colour scales, hyperparameters, steps aligned with the model's own metrics, batch-key warnings."""

from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import attnmonitor.dashboards as dashboards_module
from attnmonitor import STATISTICS, AttentionMonitor, MonitorEngine, MonitorOptions
from attnmonitor.demo import TinyGPT
from attnmonitor.tensorboard.render import head_atlas
from attnmonitor.tensorboard.worker import FigureWorker
from tests.helpers.events import read_custom_scalar_layout, read_events, read_hparams
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer

VOCAB, SEQ = 40, 12
GROUPS = tuple(f"attn_{stage}{group}/" for stage in ("train", "val") for group in ("", "_layers", "_example", "_heatmap"))


def _loader(n: int = 32, seed: int = 0) -> DataLoader:
    ids = torch.randint(VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short training run with validation, images at every capture; its event files read back."""
    tmp_path = tmp_path_factory.mktemp("dashboards")
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 2}, dashboards={"heatmaps": {"every_n_steps": 2, "max_tokens": 12}}
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=6, val_check_interval=3, log_every_n_steps=2, limit_val_batches=2)
    trainer.fit(model, _loader(), _loader(n=8, seed=1))
    return tmp_path / "tb" / "version_0"


def test_every_monitor_tag_is_in_its_own_group(run):
    events = read_events(run)
    ours = [t for kind in ("scalars", "images", "tensors") for t in events.Tags()[kind] if t.startswith("attn")]
    assert ours and all(tag.startswith(GROUPS) for tag in ours), [t for t in ours if not t.startswith(GROUPS)]
    scalars = set(events.Tags()["scalars"])
    assert {f"attn_train/{n}" for n in STATISTICS if n != "next_token_weight"} <= scalars  # one chart per statistic
    assert not any("next_token_weight" in t for t in scalars)  # causal attention: 0 by construction, not charted
    assert "attn_train_layers/entropy/blocks.1.attn" in scalars


def test_custom_scalar_layout_has_a_chart_per_statistic_and_layer_with_train_and_val(run):
    layout = read_custom_scalar_layout(run)
    assert layout is not None
    categories = {category.title: {c.title: list(c.multiline.tag) for c in category.chart} for category in layout.category}
    assert list(categories)[0] == "attention, mean over layers and heads"  # the overview first
    logged = [n for n in STATISTICS if n != "next_token_weight"]  # causal: 0 by construction, not logged
    assert list(categories["attention, mean over layers and heads"]) == logged
    by_layer = categories["entropy by layer (train and val)"]
    assert by_layer == {layer: [rf"^attn_(train|val)_layers/entropy/{re.escape(layer)}$"] for layer in ("blocks.0.attn", "blocks.1.attn")}
    scalars = read_events(run).Tags()["scalars"]
    for pattern in by_layer["blocks.1.attn"]:  # the chart's two lines: train and validation of that layer only
        lines = sorted(t for t in scalars if re.search(pattern, t))
        assert lines == ["attn_train_layers/entropy/blocks.1.attn", "attn_val_layers/entropy/blocks.1.attn"]
    assert "next_token_weight by layer (train and val)" not in categories


def test_steps_equal_the_models_own_metric_steps(run):
    events = read_events(run)
    train_loss = {e.step for e in events.Scalars("train/loss")}
    ours = {e.step for e in events.Scalars("attn_train/entropy")}
    assert ours == {1, 3, 5} and ours <= train_loss  # log_every_n_steps=2 logs steps 1, 3, 5
    assert {e.step for e in events.Scalars("attn_val/entropy")} == {e.step for e in events.Scalars("val/loss")} == {2, 5}


def test_one_heatmap_per_head_that_fits_a_card(run):
    events = read_events(run)
    for layer in ("blocks.0.attn", "blocks.1.attn"):
        for head in (0, 1):
            images = events.Images(f"attn_train_heatmap/{layer}/head_{head}")
            assert [e.step for e in images] == [1, 3, 5]
            image = Image.open(io.BytesIO(images[-1].encoded_image_string))
            # 12 tokens, each labelled, 16 px cells: readable at its own size, narrower than a TensorBoard card
            assert 250 <= image.size[0] <= 460 and 200 <= image.size[1] <= 460, image.size


def test_the_monitor_options_are_hyperparameters(run):
    hparams = read_hparams(run)
    assert hparams["attnmonitor/schedule/every_n_steps"] == 2


@pytest.mark.parametrize("value", [0.3, 0.7])
def test_bounded_statistics_are_drawn_on_a_fixed_scale(value):
    grid = torch.full((3, 4), value)
    fixed = head_atlas(grid, torch.ones(3, 4, dtype=torch.bool), ["a", "b", "c"], "x", value_range=(0.0, 1.0))
    expected = np.array(colormaps["viridis"](value)[:3]) * 255
    close = np.abs(fixed.astype(float) - expected).max(-1) < 3
    assert close.sum() > 500  # the cells (text labels aside) have the colour of the value itself
    scaled = head_atlas(grid, torch.ones(3, 4, dtype=torch.bool), ["a", "b", "c"], "x")
    assert (np.abs(scaled.astype(float) - expected).max(-1) < 3).sum() < close.sum()  # autoscale differs


@ignore_few_batches
@ignore_no_validation_data
def test_a_missing_batch_key_is_named_once(tmp_path):
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(VOCAB, (SEQ + 1,), generator=torch.Generator().manual_seed(i))
            return {"tokens": ids[:-1], "targets": ids[1:]}

    class Model(TinyGPT):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["tokens"], batch["targets"]), batch_idx)

    monitor = AttentionMonitor(schedule={"every_n_steps": 1, "val_batches": 0})
    trainer = make_trainer(tmp_path, [monitor], max_steps=2, limit_val_batches=0)
    expected = r"`batch.input_key`='input_ids' is not a key of the batch, whose keys are \['targets', 'tokens'\]"
    with pytest.warns(RuntimeWarning, match=expected):
        trainer.fit(Model(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=1, heads=2), DataLoader(Dicts(), batch_size=4))


class _Publisher:
    """A plain publisher: scalars kept, figures to a real ``SummaryWriter``."""

    step_offset = 0
    figures_missing = None

    def __init__(self, log_dir) -> None:
        self.device = torch.device("cpu")
        self.writer = SummaryWriter(str(log_dir))
        self.scalars: dict[int, dict[str, float]] = {}

    def log_scalars(self, scalars, step):
        self.scalars[step] = scalars

    def logs_at(self, step):
        return True


def _captured_engine(tmp_path):
    """An engine attached to a small GPT, one training step captured with images due (published when it ends)."""
    model = TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2)
    engine = MonitorEngine(
        MonitorOptions(schedule={"every_n_steps": 1, "atlas_every_n_steps": 1}, dashboards={"heatmaps": {"every_n_steps": 1}})
    )
    engine.attach(model)
    ids, _ = next(iter(_loader()))
    engine.start_train_batch(0, (ids,))
    model(ids)
    return engine, _Publisher(tmp_path)


def test_figures_are_drawn_off_the_training_thread(tmp_path, monkeypatch):
    original = dashboards_module.write_atlases

    def slow_atlases(*args, **kwargs):
        time.sleep(1.0)  # a slow renderer: the step must not wait for it
        original(*args, **kwargs)

    monkeypatch.setattr(dashboards_module, "write_atlases", slow_atlases)
    engine, publisher = _captured_engine(tmp_path)
    start = time.perf_counter()
    engine.end_train_batch(1, publisher)  # step 0 is over: published
    stall = time.perf_counter() - start
    assert "attn_train/entropy" in publisher.scalars[0]  # scalars are logged at once
    assert stall < 0.5, stall
    engine.detach()  # waits for the pending figures
    events = read_events(tmp_path)
    assert "attn_train/atlas/entropy" in events.Tags()["images"] and "attn_train_heatmap/blocks.0.attn/head_0" in events.Tags()["images"]


def test_a_failing_figure_job_is_warned_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(dashboards_module, "write_atlases", broken)
    engine, publisher = _captured_engine(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"drawing the figures of train step 0 failed: RuntimeError\('renderer broke'\)"):
        engine.end_train_batch(1, publisher)
        engine.detach()
    assert "attn_train/entropy" in publisher.scalars[0]


def test_figure_jobs_beyond_the_queue_are_skipped_and_counted():
    worker = FigureWorker(max_pending=1)
    release = threading.Event()
    assert worker.submit(release.wait, "first")
    with pytest.warns(RuntimeWarning, match="figures of second skipped: 1 figure jobs still pending"):
        assert not worker.submit(lambda: None, "second")
    release.set()
    worker.close()
    assert worker.skipped == 1


def test_the_per_head_table_has_short_headers_a_legend_and_fixed_decimals():
    """As TensorBoard's own Markdown renderer shows it: headers short enough not to wrap, values with
    a fixed number of decimals, and a legend naming every column."""
    import re

    from tensorboard.plugin_util import markdown_to_safe_html

    from attnmonitor.tensorboard.render import statistics_table

    values = {
        "normalized_entropy": torch.tensor([[0.05763, 0.5]]),
        "prev_token_weight": torch.tensor([[1.0, float("nan")]]),
        "max_logit": torch.tensor([[1234.5678, 3.0e6]]),
    }
    html = markdown_to_safe_html(statistics_table(values, torch.tensor([[True, True]]), ["blocks.0.attn"]))
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S) for row in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)]
    assert cells == [
        ["layer", "head", "H/Hmax", "prev", "logit"],
        ["blocks.0.attn", "0", "0.058", "1.000", "1235"],
        ["blocks.0.attn", "1", "0.500", "–", "3.0e+06"],
    ]
    assert "H/Hmax: normalized_entropy, prev: prev_token_weight, logit: max_logit" in html
