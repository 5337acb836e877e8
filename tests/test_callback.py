"""AttentionMonitor in real Lightning Trainers, read back from TensorBoard event files."""

import copy
import io
import os
import re
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import STATISTICS, AttentionMonitor
from attnmonitor.demo import TinyGPT
from tests.helpers.events import read_events
from tests.helpers.models import layer_inputs
from tests.helpers.reference import attention_probs, head_max_logit, head_means
from tests.helpers.trainer import (
    ignore_few_batches,
    ignore_no_validation_data,
    ignore_resume_notices,
    make_trainer,
)

VOCAB, SEQ = 40, 12

pytestmark = [
    # incidental Lightning notices: the tiny loaders have fewer batches than the default logging interval, and
    # TinyGPT defines a validation step that most runs here leave without validation data
    ignore_few_batches,
    ignore_no_validation_data,
]


def _loader(n: int = 24, batch_size: int = 4, seed: int = 0) -> DataLoader:
    ids = torch.randint(VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=batch_size, shuffle=False)


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)


def _reference(model: TinyGPT, batches) -> dict[str, torch.Tensor]:
    """Float64 ``{statistic: [layers, heads]}`` of ``model`` over ``batches`` (independent of attnmonitor)."""
    attns = [block.attn for block in model.blocks]
    per_layer = []
    for i, attn in enumerate(attns):
        probs, valid, maxima = [], [], []
        for ids, _ in batches:
            x = layer_inputs(model, attns, ids)[i].double()
            b, seq, c = x.shape
            qkv = x @ attn.qkv.weight.double().T + attn.qkv.bias.double()
            q, k = (t.view(b, seq, attn.heads, c // attn.heads).transpose(1, 2) for t in qkv.split(c, dim=2)[:2])
            causal = torch.ones(seq, seq, dtype=torch.bool).tril()
            probs.append(attention_probs(q, k, causal))
            valid.append(causal.expand(b, 1, seq, seq))
            maxima.append(head_max_logit(q, k, causal))
        per_layer.append({**head_means(torch.cat(probs), torch.cat(valid)), "max_logit": torch.stack(maxima).amax(0)})
    return {name: torch.stack([d[name] for d in per_layer]) for name in STATISTICS}


def _scalar(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


class _Snapshot(L.Callback):
    """A copy of the model as it is when optimizer step ``step`` begins (test side, independent of the monitor)."""

    def __init__(self, step: int) -> None:
        self.step, self.model = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.model is None:
            self.model = _model()
            self.model.load_state_dict(pl_module.state_dict())


def test_training_scalars_follow_optimizer_steps_under_accumulation_and_equal_the_reference(tmp_path):
    model = _model()  # no dropout anywhere
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 4, "val_batches": 0},
        dashboards={"heatmaps": {"every_n_steps": 4, "max_tokens": 8}},
    )
    snapshot = _Snapshot(step=1)
    trainer = make_trainer(tmp_path, [monitor, snapshot], max_steps=5, accumulate_grad_batches=3, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=_loader())
    events = read_events(tmp_path / "tb" / "version_0")
    layers = ["blocks.0.attn", "blocks.1.attn"]
    logged = [name for name in STATISTICS if name != "next_token_weight"]  # causal: 0 by construction, not logged
    assert not any("next_token_weight" in tag for tag in events.Tags()["scalars"])
    for name in logged:  # steps 1 and 3: one in two, the steps Lightning logs with log_every_n_steps=2
        assert sorted(_scalar(events, f"attn_train/{name}")) == [1, 3]
        for layer in layers:
            assert sorted(_scalar(events, f"attn_train_layers/{name}/{layer}")) == [1, 3]
    # step 1 covers the three micro-batches of the second optimizer step, at the weights of that step
    micro_batches = list(_loader())[3:6]
    expected = _reference(snapshot.model.eval(), micro_batches)
    assert float(expected["next_token_weight"].abs().max()) == 0.0  # the reference agrees: nothing to log
    for name in logged:
        grid = expected[name]
        reduce = torch.amax if name == "max_logit" else torch.mean  # max_logit: maxima over heads and layers
        assert _scalar(events, f"attn_train/{name}")[1] == pytest.approx(float(reduce(grid)), rel=1e-5, abs=1e-6)
        for row, layer in enumerate(layers):
            assert _scalar(events, f"attn_train_layers/{name}/{layer}")[1] == pytest.approx(float(reduce(grid[row])), rel=1e-5, abs=1e-6)
    # images at step 3 (atlas and heatmap intervals of 4: steps 3, 7, ...), one atlas per statistic, one heatmap per layer
    tags = events.Tags()
    assert {f"attn_train/atlas/{n}" for n in STATISTICS} - {"attn_train/atlas/next_token_weight"} <= set(tags["images"])
    assert "attn_train/atlas/next_token_weight" not in tags["images"]  # 0 everywhere under a causal mask
    for name in set(STATISTICS) - {"next_token_weight"}:
        assert [e.step for e in events.Images(f"attn_train/atlas/{name}")] == [3]
    for layer in layers:
        heatmaps = events.Images(f"attn_train_heatmap/{layer}/head_0")
        assert [e.step for e in heatmaps] == [3]
        image = Image.open(io.BytesIO(heatmaps[0].encoded_image_string))
        assert image.size == (heatmaps[0].width, heatmaps[0].height) and image.size[0] > 200
        assert f"attn_train_hist/entropy/{layer}" in tags["histograms"]
    assert "attn_train/table/text_summary" in tags["tensors"]
    table = events.Tensors("attn_train/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.count("| blocks.") == 4  # 2 layers x 2 heads
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_validation_example_equals_reference_and_sanity_check_is_skipped(tmp_path):
    model = _model()
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 100, "val_batches": 2}, dashboards={"tokenizer": lambda ids: [f"t{i}" for i in ids]}
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, num_sanity_val_steps=2, val_check_interval=3)
    val = _loader(n=16, seed=1)
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=val)
    events = read_events(tmp_path / "tb" / "version_0")
    expected = _reference(model.eval(), list(val)[:2])  # the weights after training, as validated after 3 steps
    # logged at step 2, where Lightning logs the validation run's own metrics
    assert [e.step for e in events.Scalars("val/loss")] == [2]
    for name in set(STATISTICS) - {"next_token_weight"}:  # causal: 0 by construction, not logged
        reduce = torch.amax if name == "max_logit" else torch.mean
        assert _scalar(events, f"attn_val/{name}") == {2: pytest.approx(float(reduce(expected[name])), rel=1e-5, abs=1e-6)}
    assert [e.step for e in events.Images("attn_val_heatmap/blocks.1.attn/head_0")] == [2]
    assert [e.step for e in events.Images("attn_val/atlas/sink_mass")] == [2]


def test_a_single_statistic_name_is_accepted():
    assert AttentionMonitor(capture={"statistics": "entropy"}).options.capture.statistics == ["entropy"]


def test_per_head_scalars(tmp_path):
    monitor = AttentionMonitor(
        capture={"statistics": ["max_weight"]},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": {"every_n_steps": None}},
    )
    make_trainer(tmp_path, [monitor], max_steps=2, limit_val_batches=0).fit(_model(), train_dataloaders=_loader())
    scalars = set(read_events(tmp_path / "tb" / "version_0").Tags()["scalars"])
    assert {"attn_train_heads/max_weight/blocks.0.attn/head_0", "attn_train_heads/max_weight/blocks.1.attn/head_1"} <= scalars
    assert not any(tag.split("/")[1] in ("entropy", "normalized_entropy") for tag in scalars if tag.startswith("attn_train"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule={"every_n_steps": 0}), "`schedule.every_n_steps` must be an int >= 1, got 0"),
        (dict(capture={"statistics": ["entropy", "focus"]}), r"`capture.statistics`.*'focus'.*accepted names"),
        (dict(dashboards={"heatmaps": {"max_tokens": 1}}), "`heatmaps.max_tokens` must be an int >= 2, got 1"),
        (dict(dashboards={"heatmaps": {"size": 3}}), r"`dashboards.heatmaps` got unknown keys \['size'\]"),
        (dict(schedule={"val_batches": -1}), "`schedule.val_batches` must be an int >= 0"),
        (dict(dashboards={"tokenizer": 3}), "`dashboards.tokenizer` must be a tokenizer or a callable"),
        (dict(capture={"sparsity_eps": 0}), r"`capture.sparsity_eps` must be in \(0, 1\]"),
        (dict(capture={"statistics": []}), "`capture.statistics` is empty: name at least one of"),
        (dict(dashboards={"per_head": "yes"}), "`dashboards.per_head` must be a bool, got 'yes'"),
        (
            dict(dashboards={"token_classes": {"x": "the"}}),
            "`dashboards.token_classes` must be a non-empty mapping class -> list of tokens",
        ),
        (dict(decoder=len), r"unknown option\(s\) \['decoder'\]; accepted options are \[.*'dashboards'"),
        (dict(schedule={"every_n_step": 3}), r"`schedule` got unknown keys \['every_n_step'\]; accepted keys are \['every_n_steps'"),
        (dict(capture={"targets": "["}), r"`capture.targets` holds an invalid regular expression '\['"),
    ],
)
def test_invalid_options_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(capture={"targets": r"encoder\.\d+"}), r"selects no module of TinyGPT.*'blocks.0.attn'"),
        (
            dict(dashboards={"heatmaps": {"layers": [r"decoder\..*"]}}),
            r"`dashboards.heatmaps.layers`.*matches none of the attention layers",
        ),
    ],
)
def test_options_that_do_not_fit_the_model_fail_before_training(tmp_path, kwargs, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [AttentionMonitor(**kwargs)], max_steps=2).fit(model, train_dataloaders=_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


# the second run reuses the checkpoint directory and resumes mid-epoch on purpose: Lightning's notices are incidental
@ignore_resume_notices
def test_resume_continues_the_schedule(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    monitor = AttentionMonitor(
        capture={"statistics": ["entropy"]},
        schedule={"every_n_steps": 2, "val_batches": 0},
        dashboards={"heatmaps": {"every_n_steps": None}},
    )
    make_trainer(tmp_path, [monitor, checkpoint], max_steps=4, enable_checkpointing=True, limit_val_batches=0).fit(
        _model(), train_dataloaders=_loader()
    )
    assert monitor.engine.last_train_step == 3
    resumed = AttentionMonitor(
        capture={"statistics": ["entropy"]},
        schedule={"every_n_steps": 2, "val_batches": 0},
        dashboards={"heatmaps": {"every_n_steps": None}},
    )
    trainer = make_trainer(tmp_path, [resumed, checkpoint], max_steps=8, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(_model(), train_dataloaders=_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.engine.last_train_step == 7
    assert sorted(_scalar(read_events(tmp_path / "tb" / "version_0"), "attn_train/entropy")) == [1, 3, 5, 7]


def test_two_monitors_coexist(tmp_path):
    a = AttentionMonitor(capture={"statistics": ["entropy"]}, schedule={"every_n_steps": 2, "val_batches": 0})
    b = AttentionMonitor(
        capture={"statistics": ["sink_mass"], "targets": [r"blocks\.0\.attn"]}, schedule={"every_n_steps": 3, "val_batches": 0}
    )
    assert a.state_key != b.state_key
    make_trainer(tmp_path, [a, b], max_steps=6, limit_val_batches=0).fit(_model(), train_dataloaders=_loader())
    events = read_events(tmp_path / "tb" / "version_0")
    assert sorted(_scalar(events, "attn_train/entropy")) == [1, 3, 5]
    assert sorted(_scalar(events, "attn_train_layers/sink_mass/blocks.0.attn")) == [2, 5]
    assert "attn_train_layers/sink_mass/blocks.1.attn" not in events.Tags()["scalars"]


def test_non_finite_attention_is_skipped_counted_and_training_goes_on(tmp_path):
    model = _model()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")  # layer 1 diverged; layer 0 is fine
    monitor = AttentionMonitor(
        capture={"statistics": ["entropy"]},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"heatmaps": {"every_n_steps": None}},
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match=r"^attnmonitor: ") as record:  # every warning of the monitor, checked below
        trainer.fit(model, train_dataloaders=_loader())
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert any(re.search(r"skipped a capture of layer 'blocks.1.attn'.*NaN", m) for m in messages), messages
    assert trainer.global_step == 3  # training went on (the NaN loss soon poisons every layer)
    assert sum("'blocks.1.attn'" in m for m in messages) == 1  # warned once per layer
    assert sum(bool(re.search(r"skipped a capture of layer 'blocks.0.attn'.*NaN", m)) for m in messages) == 1  # poisoned at step 1
    events = read_events(tmp_path / "tb" / "version_0")
    assert sorted(_scalar(events, "attn_train_layers/entropy/blocks.0.attn")) == [0]  # step 0: layer 0 was still finite
    assert "attn_train_layers/entropy/blocks.1.attn" not in events.Tags()["scalars"]
    assert _scalar(events, "attn_health/skipped_captures") == {0: 1.0}
    assert sum("nothing logged" in m for m in messages) == 1  # later steps: one warning


class _ResidentMemory(L.Callback):
    """Current resident set size (MB) at chosen steps."""

    def __init__(self, steps):
        self.steps, self.mb = set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            with open(f"/proc/{os.getpid()}/statm") as f:
                self.mb[trainer.global_step] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_a_1000_step_run_keeps_memory_figures_hooks_and_event_files_bounded(tmp_path):
    model = _model()
    memory = _ResidentMemory([300, 1000])
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 10, "atlas_every_n_steps": 100}, dashboards={"heatmaps": {"every_n_steps": 100, "max_tokens": 12}}
    )
    trainer = make_trainer(tmp_path, [monitor, memory], max_steps=1000, val_check_interval=250, check_val_every_n_epoch=None)
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader(n=8, seed=3))
    assert memory.mb[1000] - memory.mb[300] < 30, memory.mb  # no growth after warm-up
    if "matplotlib.pyplot" in sys.modules:  # attnmonitor never uses pyplot: no figure can be left open
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())
    size_mb = sum(p.stat().st_size for p in (tmp_path / "tb").rglob("*") if p.is_file()) / 2**20
    image_steps = 10 + 4  # training images every 100 steps, validation every 250
    assert size_mb < 0.5 * image_steps, size_mb  # documented budget: under 0.5 MB per image step (this model)
    events = read_events(tmp_path / "tb" / "version_0")
    assert len(events.Scalars("attn_train/entropy")) == 100


def test_flat_option_names_still_work_with_a_warning_naming_their_group():
    with pytest.warns(FutureWarning, match=r"`every_n_steps` is now `schedule.every_n_steps`") as record:
        monitor = AttentionMonitor(every_n_steps=7, heatmaps=None, schedule={"val_batches": 0})
    assert any("`heatmaps` is now `dashboards.heatmaps`" in str(w.message) for w in record)
    options = monitor.options
    assert (options.schedule.every_n_steps, options.schedule.val_batches, options.dashboards.heatmaps) == (7, 0, None)


@pytest.mark.parametrize(
    "kwargs",
    [dict(regularizer={"entropy_weight": 0.0}), dict(clip={"min": 0.0, "max": 1.0}), dict(qk_clip={"tau": None})],
)
def test_groups_that_do_nothing_are_off(kwargs):
    (name,) = kwargs
    assert getattr(AttentionMonitor(**kwargs).options, name) is None
