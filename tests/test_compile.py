"""Compiled models: uncaptured steps run the compiled graph untouched, captured steps equal eager ones."""

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import AttentionCapture, AttentionMonitor
from attnmonitor.demo import TinyGPT
from tests.helpers.events import read_events
from tests.helpers.models import EagerAttention, SdpaAttention, TinyTransformer
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer

VOCAB, SEQ, STEPS, EVERY = 40, 12, 12, 4
CAPTURED = [EVERY - 1, 2 * EVERY - 1, 3 * EVERY - 1]


class _UnloggedGPT(TinyGPT):
    """The demo GPT without ``self.log`` in ``training_step``: Lightning 2.6 compiles the steps of a
    ``torch.compile``d module, and dynamo cannot trace ``self.log``."""

    def training_step(self, batch, batch_idx):
        return self._loss(batch)


def _loader() -> DataLoader:
    ids = torch.randint(VOCAB, (4 * STEPS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)


def _fit(tmp_path, compile_how: str | None, monitor: bool) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """Train the demo GPT; dynamo's graph statistics and the monitor's logged entropy per layer."""
    torch._dynamo.reset()
    counters.clear()
    L.seed_everything(0, verbose=False)
    model = (_UnloggedGPT if compile_how == "wrapper" else TinyGPT)(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2)
    fitted = model
    if compile_how == "wrapper":
        fitted = torch.compile(model, backend="eager")  # Lightning unwraps it and compiles forward and the steps
    elif compile_how == "model":
        model.compile(backend="eager")  # dynamo traces; the backend runs its graph as is (fast to compile)
    elif compile_how == "blocks":
        for block in model.blocks:
            block.compile(backend="eager")
    callbacks = [AttentionMonitor(schedule={"every_n_steps": EVERY}, dashboards={"heatmaps": None, "analyses": False})] if monitor else []
    trainer = make_trainer(tmp_path, callbacks, max_steps=STEPS, log_every_n_steps=EVERY)
    trainer.fit(fitted, _loader())
    graphs = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    events = read_events(tmp_path / "tb" / "version_0") if monitor else None
    entropy = (
        {}
        if events is None
        else {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"] if "entropy" in tag}
    )
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch._dynamo.reset()
    return graphs, entropy


@ignore_few_batches
@ignore_no_validation_data
@pytest.mark.parametrize("compile_how", ["model", "blocks", "wrapper"])
def test_uncaptured_steps_run_the_compiled_graph_and_captured_steps_equal_eager(tmp_path, compile_how):
    unmonitored, _ = _fit(tmp_path / "plain", compile_how, monitor=False)
    monitored, entropy = _fit(tmp_path / "monitored", compile_how, monitor=True)
    _, eager_entropy = _fit(tmp_path / "eager", None, monitor=True)
    assert unmonitored["graphs"] >= 1
    assert monitored == unmonitored  # no graph break, no recompilation: captured steps ran outside the graph
    assert torch._dynamo.eval_frame._stance.stance == "default"  # the monitor's eager stance was left
    assert set(entropy) == set(eager_entropy) and len(entropy) >= 2
    for tag, values in eager_entropy.items():
        assert sorted(values) == CAPTURED
        for step, value in values.items():
            assert entropy[tag][step] == pytest.approx(value, abs=1e-5), (tag, step)


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
@pytest.mark.parametrize("how", ["wrapper", "in_place", "submodules"])
def test_compiled_models_are_captured_like_eager_ones(layer, how):
    torch.manual_seed(10)
    model = TinyTransformer(layer, causal=True, dropout=0.0).eval()
    ids = torch.randint(50, (2, 8))
    with AttentionCapture(model) as eager, torch.no_grad():
        expected_out = model(ids)
    compiled = model
    if how == "wrapper":
        compiled = torch.compile(model, backend="eager")
    elif how == "in_place":
        model.compile(backend="eager")
    else:
        for block in model.layers:
            block.compile(backend="eager")
    with torch.no_grad():
        compiled(ids)  # compiled before the capture is attached
    with AttentionCapture(compiled) as cap, torch.no_grad():
        out = compiled(ids)
    torch.testing.assert_close(out, expected_out)
    for name, value in eager.stats().items():
        torch.testing.assert_close(cap.stats()[name], value, rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())
    torch._dynamo.reset()


def test_a_disabled_capture_leaves_the_compiled_graph_alone():
    torch.manual_seed(11)
    model = TinyTransformer(SdpaAttention, causal=True, dropout=0.0).eval()
    model.compile(backend="eager")
    ids = torch.randint(50, (2, 8))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        model(ids)
    graphs = counters["stats"]["unique_graphs"]
    with AttentionCapture(model) as cap, torch.no_grad():
        model(ids)  # captured: eager
        cap.enabled = False
        assert all(not m._forward_hooks for m in model.modules())
        model(ids)  # not captured: the cached graph
        cap.enabled = True
        model(ids)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    assert cap.valid_rows()["layers.0"].tolist() == [2 * 8 * 2.0] * 4  # 2 sequences x 8 rows x the two captured forwards, 4 heads
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_model_statistics_within_1e_5_of_eager():
    torch.manual_seed(13)
    model = TinyTransformer(SdpaAttention, causal=True, dropout=0.0).eval()
    ids = torch.randint(50, (2, 8))
    with AttentionCapture(model) as eager, torch.no_grad():
        model(ids)
    compiled = torch.compile(model)  # the default inductor backend: real compiled kernels
    with torch.no_grad():
        compiled(ids)
    with AttentionCapture(compiled) as cap, torch.no_grad():
        compiled(ids)
    for name, value in eager.stats().items():
        torch.testing.assert_close(cap.stats()[name], value, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
