"""AttentionMonitor in real Lightning Trainers, read back from TensorBoard event files."""

import copy
import io

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import STATISTICS, AttentionMonitor
from attnmonitor.demo import TinyGPT
from tests.models import layer_inputs
from tests.reference import attention_probs, head_means

VOCAB, SEQ = 40, 12


def _loader(n: int = 24, batch_size: int = 4, seed: int = 0) -> DataLoader:
    ids = torch.randint(VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=batch_size, shuffle=False)


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)


def _trainer(tmp_path, monitor, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    return L.Trainer(**{**defaults, **kwargs})


def _events(tmp_path) -> EventAccumulator:
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def _reference(model: TinyGPT, batches) -> dict[str, torch.Tensor]:
    """Float64 ``{statistic: [layers, heads]}`` of ``model`` over ``batches`` (independent of attnmonitor)."""
    attns = [block.attn for block in model.blocks]
    per_layer = []
    for i, attn in enumerate(attns):
        probs, valid = [], []
        for ids, _ in batches:
            x = layer_inputs(model, attns, ids)[i].double()
            b, l, c = x.shape
            qkv = x @ attn.qkv.weight.double().T + attn.qkv.bias.double()
            q, k = (t.view(b, l, attn.heads, c // attn.heads).transpose(1, 2) for t in qkv.split(c, dim=2)[:2])
            causal = torch.ones(l, l, dtype=torch.bool).tril()
            probs.append(attention_probs(q, k, causal))
            valid.append(causal.expand(b, 1, l, l))
        per_layer.append(head_means(torch.cat(probs), torch.cat(valid)))
    return {name: torch.stack([d[name] for d in per_layer]) for name in STATISTICS}


def _scalar(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


def test_training_scalars_follow_optimizer_steps_under_accumulation_and_equal_the_reference(tmp_path):
    model = _model().eval()  # no dropout anywhere; Lightning switches to train mode anyway
    initial = copy.deepcopy(model)
    monitor = AttentionMonitor(every_n_steps=2, heatmaps={"every_n_steps": 4, "max_tokens": 8}, atlas_every_n_steps=4, val_batches=0)
    trainer = _trainer(tmp_path, monitor, max_steps=5, accumulate_grad_batches=3, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=_loader())
    events = _events(tmp_path)
    layers = ["blocks.0.attn", "blocks.1.attn"]
    for name in STATISTICS:
        assert sorted(_scalar(events, f"attn/train/{name}")) == [0, 2, 4]
        for layer in layers:
            assert sorted(_scalar(events, f"attn/train/{name}/{layer}")) == [0, 2, 4]
    # step 0 covers the three micro-batches of the first optimizer step, at the initial weights
    first_three = list(_loader())[:3]
    expected = _reference(initial, first_three)
    for name in STATISTICS:
        grid = expected[name]
        assert _scalar(events, f"attn/train/{name}")[0] == pytest.approx(float(grid.mean()), rel=1e-5, abs=1e-6)
        for row, layer in enumerate(layers):
            assert _scalar(events, f"attn/train/{name}/{layer}")[0] == pytest.approx(float(grid[row].mean()), rel=1e-5, abs=1e-6)
    # images at steps 0 and 4 (atlas and heatmap intervals), one atlas per statistic, one heatmap per layer
    tags = events.Tags()
    assert {f"attn/train/atlas/{n}" for n in STATISTICS} <= set(tags["images"])
    for name in STATISTICS:
        assert [e.step for e in events.Images(f"attn/train/atlas/{name}")] == [0, 4]
    for layer in layers:
        heatmaps = events.Images(f"attn/train/heatmap/{layer}")
        assert [e.step for e in heatmaps] == [0, 4]
        image = Image.open(io.BytesIO(heatmaps[0].encoded_image_string))
        assert image.size == (heatmaps[0].width, heatmaps[0].height) and image.size[0] > 200
        assert f"attn/train/hist/entropy/{layer}" in tags["histograms"]
    assert "attn/train/table/text_summary" in tags["tensors"]
    table = events.Tensors("attn/train/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.count("| blocks.") == 4  # 2 layers x 2 heads
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_validation_probe_equals_reference_and_sanity_check_is_skipped(tmp_path):
    model = _model()
    monitor = AttentionMonitor(every_n_steps=100, val_batches=2, decoder=lambda ids: [f"t{i}" for i in ids])
    trainer = _trainer(tmp_path, monitor, max_steps=3, num_sanity_val_steps=2, val_check_interval=3)
    val = _loader(n=16, seed=1)
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=val)
    events = _events(tmp_path)
    expected = _reference(model.eval(), list(val)[:2])  # the weights after training, as validated at step 3
    for name in STATISTICS:
        assert _scalar(events, f"attn/val/{name}") == {3: pytest.approx(float(expected[name].mean()), rel=1e-5, abs=1e-6)}
    assert [e.step for e in events.Images("attn/val/heatmap/blocks.1.attn")] == [3]
    assert [e.step for e in events.Images("attn/val/atlas/sink_mass")] == [3]


def test_per_head_scalars(tmp_path):
    monitor = AttentionMonitor(statistics=["max_weight"], every_n_steps=1, per_head=True, val_batches=0, heatmaps={"every_n_steps": None})
    _trainer(tmp_path, monitor, max_steps=2, limit_val_batches=0).fit(_model(), train_dataloaders=_loader())
    scalars = set(_events(tmp_path).Tags()["scalars"])
    assert {"attn/train/max_weight/blocks.0.attn/head_0", "attn/train/max_weight/blocks.1.attn/head_1"} <= scalars
    assert not any(tag.startswith(("attn/train/entropy", "attn/train/normalized_entropy")) for tag in scalars)


def test_other_loggers_get_scalars_and_images_are_skipped_with_one_warning(tmp_path):
    monitor = AttentionMonitor(statistics=["entropy"], every_n_steps=1, val_batches=0, atlas_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    with pytest.warns(RuntimeWarning, match="images skipped: no TensorBoardLogger") as record:
        _trainer(tmp_path, monitor, max_steps=3, logger=logger, limit_val_batches=0).fit(_model(), train_dataloaders=_loader())
    assert sum("images skipped" in str(w.message) for w in record) == 1
    header, *rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "attn/train/entropy" in header.split(",") and "attn/train/entropy/blocks.1.attn" in header.split(",")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(every_n_steps=0), "`every_n_steps` must be an int >= 1, got 0"),
        (dict(statistics=["entropy", "focus"]), r"`statistics`.*'focus'.*accepted names"),
        (dict(heatmaps={"max_tokens": 1}), "`heatmaps.max_tokens` must be an int >= 2, got 1"),
        (dict(heatmaps={"size": 3}), r"`heatmaps` got unknown keys \['size'\]"),
        (dict(val_batches=-1), "`val_batches` must be an int >= 0"),
        (dict(decoder=3), "`decoder` must be a callable"),
        (dict(sparsity_eps=0), r"`sparsity_eps` must be in \(0, 1\]"),
    ],
)
def test_invalid_options_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=r"encoder\.\d+"), r"selects no module of TinyGPT.*'blocks.0.attn'"),
        (dict(heatmaps={"layers": [r"decoder\..*"]}), r"`heatmaps.layers`.*matches none of the attention layers"),
    ],
)
def test_options_that_do_not_fit_the_model_fail_before_training(tmp_path, kwargs, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, AttentionMonitor(**kwargs), max_steps=2).fit(model, train_dataloaders=_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_resume_continues_the_schedule(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    monitor = AttentionMonitor(statistics=["entropy"], every_n_steps=2, val_batches=0, heatmaps={"every_n_steps": None})
    _trainer(tmp_path, monitor, max_steps=3, callbacks=[monitor, checkpoint], enable_checkpointing=True, limit_val_batches=0).fit(
        _model(), train_dataloaders=_loader()
    )
    assert monitor.last_train_step == 2
    resumed = AttentionMonitor(statistics=["entropy"], every_n_steps=2, val_batches=0, heatmaps={"every_n_steps": None})
    trainer = _trainer(tmp_path, resumed, max_steps=7, callbacks=[resumed, checkpoint], enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(_model(), train_dataloaders=_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.last_train_step == 6
    assert sorted(_scalar(_events(tmp_path), "attn/train/entropy")) == [0, 2, 4, 6]


def test_two_monitors_coexist(tmp_path):
    a = AttentionMonitor(statistics=["entropy"], every_n_steps=2, val_batches=0)
    b = AttentionMonitor(statistics=["sink_mass"], every_n_steps=3, val_batches=0, targets=[r"blocks\.0\.attn"])
    assert a.state_key != b.state_key
    _trainer(tmp_path, a, max_steps=4, callbacks=[a, b], limit_val_batches=0).fit(_model(), train_dataloaders=_loader())
    events = _events(tmp_path)
    assert sorted(_scalar(events, "attn/train/entropy")) == [0, 2]
    assert sorted(_scalar(events, "attn/train/sink_mass/blocks.0.attn")) == [0, 3]
    assert "attn/train/sink_mass/blocks.1.attn" not in events.Tags()["scalars"]


def test_non_finite_attention_is_skipped_counted_and_training_goes_on(tmp_path):
    model = _model()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")  # layer 1 diverged; layer 0 is fine
    monitor = AttentionMonitor(statistics=["entropy"], every_n_steps=1, val_batches=0, heatmaps={"every_n_steps": None})
    trainer = _trainer(tmp_path, monitor, max_steps=3, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match=r"skipped a capture of layer 'blocks.1.attn'.*NaN") as record:
        trainer.fit(model, train_dataloaders=_loader())
    assert trainer.global_step == 3  # training went on (the NaN loss soon poisons every layer)
    assert sum("'blocks.1.attn'" in str(w.message) for w in record) == 1  # warned once per layer
    events = _events(tmp_path)
    assert sorted(_scalar(events, "attn/train/entropy/blocks.0.attn")) == [0]  # step 0: layer 0 was still finite
    assert "attn/train/entropy/blocks.1.attn" not in events.Tags()["scalars"]
    assert _scalar(events, "attn/skipped_captures") == {0: 1.0}
    assert sum(1 for w in record if "nothing logged" in str(w.message)) == 1  # later steps: one warning


class _ResidentMemory(L.Callback):
    """Current resident set size (MB) at chosen steps."""

    def __init__(self, steps):
        self.steps, self.mb = set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            import os

            with open(f"/proc/{os.getpid()}/statm") as f:
                self.mb[trainer.global_step] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_a_1000_step_run_keeps_memory_figures_hooks_and_event_files_bounded(tmp_path):
    import sys

    model = _model()
    memory = _ResidentMemory([300, 1000])
    monitor = AttentionMonitor(every_n_steps=10, atlas_every_n_steps=100, heatmaps={"every_n_steps": 100, "max_tokens": 12})
    trainer = _trainer(
        tmp_path, monitor, max_steps=1000, callbacks=[monitor, memory], val_check_interval=250, check_val_every_n_epoch=None
    )
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader(n=8, seed=3))
    assert memory.mb[1000] - memory.mb[300] < 30, memory.mb  # no growth after warm-up
    if "matplotlib.pyplot" in sys.modules:  # attnmonitor never uses pyplot: no figure can be left open
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())
    size_mb = sum(p.stat().st_size for p in (tmp_path / "tb").rglob("*") if p.is_file()) / 2**20
    image_steps = 10 + 4  # training images every 100 steps, validation every 250
    assert size_mb < 0.5 * image_steps, size_mb  # documented budget: under 0.5 MB per image step (this model)
    events = _events(tmp_path)
    assert len(events.Scalars("attn/train/entropy")) == 100
