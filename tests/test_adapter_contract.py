"""The adapter contract: Lightning, the Hugging Face ``Trainer`` and a plain loop, driven on the same
model and the same batches, publish the same statistics at the same steps, fire the same alarms, take
the same actions, and resume the same way from their own checkpoints.

Each driver trains the same float64 GPT-2 (same seed, no dropout, SGD at a fixed learning rate, the
same batches in the same order) and returns a normalised record (see :class:`Record`): steps are
0-based optimizer steps (the Trainer's are mapped back by -1) and layer names those of the GPT-2
itself (the Lightning module holds it as ``model``: that prefix is dropped).
"""

from __future__ import annotations

import copy
import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, default_collate

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from attnmonitor import AttentionMonitor  # noqa: E402
from attnmonitor.alarms import TAG_GROUP  # noqa: E402
from attnmonitor.integrations.loop import AttentionMonitorLoop  # noqa: E402
from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer  # noqa: E402

ADAPTERS = ["lightning", "transformers", "loop"]

VOCAB, SEQ, HEADS, BATCH, BATCHES_PER_EPOCH = 32, 8, 2, 2, 2
LAYERS = ["transformer.h.0.attn", "transformer.h.1.attn"]
STEPS, LR = 10, 0.5
"""Optimizer steps 0..9 unless an alarm stops training; SGD without momentum or weight decay."""
RESUME_AT = 2
"""The interrupted runs save after this many steps (an epoch boundary, between the captures of steps 1 and 3)."""


class Collect:
    """A callable alarm action: keeps every firing it receives."""

    def __init__(self) -> None:
        self.firings: list[Any] = []

    def __call__(self, firings: list[Any]) -> None:
        self.firings.extend(firings)


COLLECT = Collect()
"""The action of warnings (``logit_growth``); each driver empties it before its run."""

OPTIONS: dict[str, Any] = {
    "schedule": {"every_n_steps": 2, "val_batches": 0},  # captures at steps 1, 3, 5, 7, 9
    "capture": {"statistics": ["entropy", "max_logit", "sink_mass"]},
    "dashboards": {"per_head": True, "heatmaps": None, "analyses": False},
    "alarms": {
        "entropy_collapse": None,
        # every head's max_logit is above the ceiling 0: a warning at the first capture, one episode to the end
        "logit_growth": {"ceiling": 0.0, "factor": 1e9, "span": 8},
        # a head's sink mass moves by more than `jump` from its mean over the earlier captures of the span:
        # `jump` is chosen from the float64 reference so that this first happens after the interruption
        "sink_jump": {"jump": None, "span": 8},
        "actions": {"info": "stop", "warning": COLLECT, "critical": "log"},
        "every_n_steps": None,
    },
}
"""Every monitor option of this file, in one place (the same for every adapter)."""

CAPTURES = [s for s in range(STEPS) if (s + 1) % OPTIONS["schedule"]["every_n_steps"] == 0]


def sink_jumps() -> dict[int, float]:
    """``{captured step: largest |sink mass − its mean over the earlier captures of the span|}`` over the
    reference's heads, from the second capture on (the first has no history)."""
    sink, span = reference().sink_mass, OPTIONS["alarms"]["sink_jump"]["span"]
    jumps = {}
    for step in CAPTURES[1:]:
        history = torch.stack([sink[s] for s in CAPTURES if step - span <= s < step])
        jumps[step] = float((sink[step] - history.mean(0)).abs().max())
    return jumps


@functools.cache
def stop_step() -> int:
    """Sets ``sink_jump.jump`` halfway between the largest jump at the capture before the interruption and
    the largest one after it; returns the first capture whose jump exceeds it (the stop)."""
    jumps = sink_jumps()
    before = max((j for step, j in jumps.items() if step < RESUME_AT), default=0.0)
    after = max(j for step, j in jumps.items() if step >= RESUME_AT)
    assert after > 1.5 * before, f"the reference's sink mass jumps no more after step {RESUME_AT} than before: {jumps}"
    OPTIONS["alarms"]["sink_jump"]["jump"] = (before + after) / 2
    return next(step for step, j in jumps.items() if j > (before + after) / 2)


def trained() -> list[int]:
    """The captures of a run, up to the stop."""
    return [s for s in CAPTURES if s <= stop_step()]


pytestmark = [
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]


# ------------------------------------------------------------------------------------------------
# the model and the data, shared by every adapter


def gpt2(impl: str = "sdpa") -> transformers.GPT2LMHeadModel:
    """The float64 GPT-2 every run starts from (seed 0, no dropout)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=len(LAYERS),
        n_head=HEADS,
        n_positions=16,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation=impl).to(torch.float64)
    model.loss_type = "ForCausalLM"  # the Trainer then counts the shifted targets: its loss is the model's own mean
    return model


def _samples() -> list[dict[str, torch.Tensor]]:
    """One epoch: ``BATCHES_PER_EPOCH * BATCH`` right-padded sequences (2 to ``SEQ`` real tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(BATCHES_PER_EPOCH * BATCH):
        mask = (torch.arange(SEQ) < 2 + (i * 3) % (SEQ - 1)).long()
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


SAMPLES = _samples()
BATCHES = [default_collate(SAMPLES[i * BATCH : (i + 1) * BATCH]) for i in range(BATCHES_PER_EPOCH)]
"""Optimizer step ``s`` trains on ``BATCHES[s % BATCHES_PER_EPOCH]`` under every adapter (no shuffling)."""


def _batch(step: int) -> dict[str, torch.Tensor]:
    return BATCHES[step % BATCHES_PER_EPOCH]


# ------------------------------------------------------------------------------------------------
# the normalised record of a run


@dataclass
class Record:
    """What a run published and did, in 0-based optimizer steps.

    Attributes:
        scalars: ``{captured step: {tag: value}}`` of the training statistics (``attn_train*`` tags).
        firings: ``(step, rule, layer, head)`` of the firings the callable action received.
        checkpoints: steps after which the monitor asked for a checkpoint (read back from disk where the adapter saves it).
        stops: steps after which the adapter's own stop flag was set.
        trained: optimizer steps done when the run ended.
        published: the captured steps in publication order (a step published twice appears twice).
    """

    scalars: dict[int, dict[str, float]] = field(default_factory=dict)
    firings: list[tuple[int, str, str, int]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)
    trained: int = 0
    published: list[int] = field(default_factory=list)

    def add(self, step: int, scalars: dict[str, float]) -> None:
        train = {tag: float(v) for tag, v in scalars.items() if tag.startswith("attn_train") and not tag.startswith(TAG_GROUP)}
        if train:
            self.published.append(step)
            self.scalars.setdefault(step, {}).update(train)


def _firings(offset: int = 0, prefix: str = "") -> list[tuple[int, str, str, int]]:
    return [(f.step - offset, f.rule, f.layer.removeprefix(prefix), f.head) for f in COLLECT.firings]


# ------------------------------------------------------------------------------------------------
# Lightning


class _LitGPT2(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class _LightningStops(L.Callback):
    """After the monitor (callbacks run in order): the steps at whose end ``trainer.should_stop`` is set."""

    def __init__(self) -> None:
        self.stops: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.should_stop:
            self.stops.append(trainer.global_step - 1)


def run_lightning(root: Path, steps: int = STEPS, save_steps: int | None = None, resume: Path | None = None) -> Record:
    """``Trainer.fit`` for ``steps`` steps, logging to a new ``CSVLogger`` version under ``root``; a
    ``ModelCheckpoint`` every ``save_steps`` steps (into ``root/ckpt``); ``resume``: ``fit(ckpt_path=resume)``."""
    COLLECT.firings.clear()
    monitor, stops = AttentionMonitor(**OPTIONS), _LightningStops()
    callbacks: list[L.Callback] = [monitor, stops]
    if save_steps:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_steps, save_top_k=-1))
    trainer = L.Trainer(
        default_root_dir=root,
        logger=CSVLogger(root, name="csv"),
        callbacks=callbacks,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(save_steps),
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    loader = DataLoader(SAMPLES, batch_size=BATCH, shuffle=False)
    trainer.fit(_LitGPT2(), train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    record = Record(firings=_firings(prefix="model."), stops=stops.stops, trained=trainer.global_step)
    with open(Path(trainer.log_dir) / "metrics.csv") as file:
        for row in csv.DictReader(file):
            values = {tag.replace("/model.", "/"): float(v) for tag, v in row.items() if tag != "step" and v != ""}
            record.add(int(row["step"]), values)
    for path in sorted((Path(trainer.log_dir) / "alarm_checkpoints").glob("step=*.ckpt")):
        step = int(path.stem.removeprefix("step="))
        assert torch.load(path, weights_only=False)["global_step"] == step + 1  # saved after that step
        record.checkpoints.append(step)
    return record


# ------------------------------------------------------------------------------------------------
# Hugging Face Trainer


class _TrainerProbe(transformers.TrainerCallback):
    """After the monitor (it binds itself right after ``DefaultFlowCallback``): where the log history of
    this ``train()`` starts, and the steps at whose end ``control.should_training_stop`` is set."""

    def __init__(self) -> None:
        self.history_start = 0
        self.stops: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.history_start = len(state.log_history)  # a resumed run starts with the checkpoint's history

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop and state.global_step < state.max_steps:  # DefaultFlowCallback sets it at max_steps
            self.stops.append(state.global_step - 1)


def run_transformers(output: Path, steps: int = STEPS, save_steps: int | None = None, resume: bool = False) -> Record:
    """``AttentionMonitorTrainer.train()`` for ``steps`` steps; checkpoints every ``save_steps``;
    ``resume``: ``train(resume_from_checkpoint=True)`` from the last checkpoint under ``output``."""
    COLLECT.firings.clear()
    args = transformers.TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        log_level="error",
    )
    monitor, probe = AttentionMonitorCallback(**OPTIONS), _TrainerProbe()
    trainer = AttentionMonitorTrainer(model=gpt2(), args=args, train_dataset=SAMPLES, callbacks=[monitor, probe])
    trainer.train(resume_from_checkpoint=True if resume else None)
    record = Record(firings=_firings(offset=1), stops=probe.stops, trained=trainer.state.global_step)
    for entry in trainer.state.log_history[probe.history_start :]:
        record.add(entry["step"] - 1, entry)  # the Trainer logs a capture of step s at its step s + 1
    if not save_steps:  # only the alarms save
        record.checkpoints = sorted(int(p.name.removeprefix("checkpoint-")) - 1 for p in output.glob("checkpoint-*"))
    return record


# ------------------------------------------------------------------------------------------------
# plain loop


def run_loop(root: Path, steps: int = STEPS, save: Path | None = None, resume: Path | None = None) -> Record:
    """A hand-written loop for ``steps`` steps (from the file ``resume``); ``save``: model, optimizer,
    step and ``monitor.state_dict()`` to a file at the end (and at every checkpoint the monitor asks for)."""
    COLLECT.firings.clear()
    model = gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = AttentionMonitorLoop(model, **OPTIONS)
    start, record = 0, Record()

    def checkpoint(path: Path, step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "monitor": monitor.state_dict()}
        torch.save(state, path)

    if resume is not None:
        state = torch.load(resume, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        monitor.load_state_dict(state["monitor"])
        start = state["step"]
    with monitor:
        for step in range(start, steps):
            batch = _batch(step)
            with monitor.step(step, batch):
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            record.add(step, monitor.log())
            record.trained = step + 1
            if monitor.should_checkpoint:
                checkpoint(root / f"alarm-step={step}.pt", step + 1)
                record.checkpoints.append(step)
            if monitor.should_stop:
                record.stops.append(step)
                break
    if save is not None:
        checkpoint(save, record.trained)
    record.firings = _firings()
    return record


# ------------------------------------------------------------------------------------------------
# the float64 reference, independent of attnmonitor


@dataclass
class Reference:
    """Per captured step, float64 ``[layers, heads]`` means over the valid query rows of the eager attention."""

    entropy: dict[int, torch.Tensor]
    sink_mass: dict[int, torch.Tensor]


def _row_means(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` per-row values -> ``[H]`` means over the valid query rows ``rows`` ``[B, 1, L]``."""
    return values.masked_fill(~rows, 0).sum((0, 2)) / rows.sum()


@functools.cache
def reference() -> Reference:
    """Trains the GPT-2 by hand (the same batches and SGD) and, at each captured step, runs the eager
    model on a copy of the weights that step starts from, with ``output_attentions=True``."""
    model = gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    weights = {}
    for step in range(STEPS):
        if step in CAPTURES:
            weights[step] = copy.deepcopy(model.state_dict())
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    entropy, sink_mass = {}, {}
    for step, state in weights.items():
        eager = gpt2("eager")
        eager.load_state_dict(state)
        batch = _batch(step)
        with torch.no_grad():
            outputs = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        rows = batch["attention_mask"].bool()[:, None, :]  # [B, 1, L] valid query rows
        probs = [p.double() for p in outputs.attentions]  # [B, H, L, L] per layer
        entropy[step] = torch.stack([_row_means(-torch.xlogy(p, p).sum(-1), rows) for p in probs])
        sink_mass[step] = torch.stack([_row_means(p[..., 0], rows) for p in probs])  # the first token is real in every row
    return Reference(entropy, sink_mass)


def expected_callable_firings(record: Record) -> list[tuple[int, str, str, int]]:
    """The ``logit_growth`` warning of every head whose max_logit, as ``record`` published it at the first
    capture, is above the ceiling 0: its episode starts there and lasts to the end (the run is short),
    so it is delivered once. (The values themselves are compared between adapters above.)"""
    first = record.scalars[CAPTURES[0]]
    heads = [(layer, h) for layer in LAYERS for h in range(HEADS) if first[f"attn_train_heads/max_logit/{layer}/head_{h}"] > 0]
    assert heads, "no head's max_logit is above 0 at the first capture: nothing to deliver"
    return [(CAPTURES[0], "logit_growth", layer, head) for layer, head in heads]


# ------------------------------------------------------------------------------------------------
# runs, cached per adapter (each test reads them)

DRIVERS = {"lightning": run_lightning, "transformers": run_transformers, "loop": run_loop}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """``full_run(adapter)``: the uninterrupted run of ``adapter`` (made once)."""
    runs: dict[str, Record] = {}

    def get(adapter: str) -> Record:
        stop_step()  # sets the sink_jump threshold from the reference
        if adapter not in runs:
            runs[adapter] = DRIVERS[adapter](tmp_path_factory.mktemp(f"full-{adapter}"))
        return runs[adapter]

    return get


def _tags() -> set[str]:
    tags = set()
    for name in OPTIONS["capture"]["statistics"]:
        tags.add(f"attn_train/{name}")
        for layer in LAYERS:
            tags.add(f"attn_train_layers/{name}/{layer}")
            tags.update(f"attn_train_heads/{name}/{layer}/head_{h}" for h in range(HEADS))
    return tags


def _assert_same_scalars(actual: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]) -> None:
    assert sorted(actual) == sorted(expected)
    for step in expected:
        assert actual[step].keys() == expected[step].keys(), step
        for tag, value in expected[step].items():
            assert actual[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, tag)


# ------------------------------------------------------------------------------------------------
# the contract


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_same_batches_publish_the_reference_statistics_at_the_same_steps(adapter, full_run):
    """Every capture up to the stop is published once, at its 0-based step, with the same tags; entropy
    and sink mass (per head, per layer, overall) equal the float64 eager reference of that step's weights."""
    record = full_run(adapter)
    assert record.published == trained()
    expected = reference()
    for step in trained():
        scalars = record.scalars[step]
        assert scalars.keys() == _tags(), step
        for name, values in (("entropy", expected.entropy[step]), ("sink_mass", expected.sink_mass[step])):
            for row, layer in enumerate(LAYERS):
                heads = torch.tensor([scalars[f"attn_train_heads/{name}/{layer}/head_{h}"] for h in range(HEADS)], dtype=torch.float64)
                torch.testing.assert_close(heads, values[row], rtol=1e-5, atol=1e-6, msg=f"{adapter} {name} {layer} step {step}")
                assert scalars[f"attn_train_layers/{name}/{layer}"] == pytest.approx(float(values[row].mean()), rel=1e-5)
            assert scalars[f"attn_train/{name}"] == pytest.approx(float(values.mean()), rel=1e-5)
        assert scalars["attn_train/max_logit"] > 0  # what makes the logit_growth rule (ceiling 0) fire


def test_the_three_adapters_publish_the_same_scalars(full_run):
    """Every scalar (max_logit too, which the reference leaves out) is the same under every adapter."""
    loop = full_run("loop").scalars
    for adapter in ("lightning", "transformers"):
        _assert_same_scalars(full_run(adapter).scalars, loop)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_same_alarm_firings_and_actions(adapter, full_run):
    """The callable receives each head's warning once, when its episode starts (at the first capture);
    the sink_jump info, whose action is "stop", fires at the step the reference gives: the adapter is
    asked for a checkpoint there, sets its own stop flag and trains no further step."""
    record = full_run(adapter)
    assert sorted(record.firings) == sorted(expected_callable_firings(record))
    assert record.checkpoints == [stop_step()]
    assert record.stops == [stop_step()]
    assert RESUME_AT < record.trained == stop_step() + 1 < STEPS


def _resume(adapter: str, root: Path) -> tuple[Record, Record, Path]:
    """Train ``RESUME_AT`` steps and save the framework's way, then resume in a new run (new monitor, new model)."""
    if adapter == "lightning":
        # a ModelCheckpoint at the epoch's last step, inside fit (from it, Lightning resumes the data order exactly)
        first = run_lightning(root, steps=RESUME_AT, save_steps=RESUME_AT)
        (path,) = (root / "ckpt").glob(f"*step={RESUME_AT}.ckpt")
        return first, run_lightning(root, save_steps=RESUME_AT, resume=path), path
    if adapter == "transformers":
        first = run_transformers(root, steps=RESUME_AT, save_steps=RESUME_AT)
        return first, run_transformers(root, save_steps=RESUME_AT, resume=True), root / f"checkpoint-{RESUME_AT}"
    path = root / "interrupted.pt"
    first = run_loop(root, steps=RESUME_AT, save=path)
    return first, run_loop(root, resume=path), path


def _saved_monitor_state(adapter: str, checkpoint: Path) -> dict[str, Any]:
    if adapter == "lightning":
        callbacks = torch.load(checkpoint, weights_only=False)["callbacks"]
        (state,) = (v for k, v in callbacks.items() if k.startswith("AttentionMonitor"))
        alarms = state["alarms"]  # the LightningModule holds the model as `model`
        history = {layer.removeprefix("model."): h for layer, h in alarms["history"].items()}
        episodes = [{**e, "layer": e["layer"].removeprefix("model.")} for e in alarms["episodes"]]
        return {**state, "alarms": {"history": history, "episodes": episodes}}
    if adapter == "transformers":  # the Trainer counts steps from 1: back to 0-based steps
        state = json.loads((checkpoint / "attnmonitor_state.json").read_text())
        alarms = state["alarms"]
        history = {layer: {**h, "steps": [s - 1 for s in h["steps"]]} for layer, h in alarms["history"].items()}
        episodes = [{**e, "since": e["since"] - 1} for e in alarms["episodes"]]
        return {**state, "alarms": {"history": history, "episodes": episodes}}
    return torch.load(checkpoint, weights_only=True)["monitor"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_resume_restores_the_alarm_history_and_publishes_no_step_twice(adapter, full_run, tmp_path):
    """Interrupted after 4 steps (2 captures) and resumed from a real checkpoint: sink_jump stops at the
    same step as the uninterrupted run, which needs the sink mass of the captures before the
    interruption (the history restored), and the warnings' episodes, open since the first capture, are
    not delivered again (the episodes restored); the resumed run publishes only steps after the last
    one published, and both parts together equal the uninterrupted run."""
    stop_step()
    first, second, checkpoint = _resume(adapter, tmp_path)
    full = full_run(adapter)
    published = [s for s in trained() if s < RESUME_AT]
    state = _saved_monitor_state(adapter, checkpoint)
    assert state["last_train_step"] == published[-1]
    alarms = state["alarms"]
    assert {layer: h["steps"] for layer, h in alarms["history"].items()} == {layer: published for layer in LAYERS}
    assert {(e["rule"], e["layer"], e["head"], e["since"]) for e in alarms["episodes"]} == {
        (rule, layer, head, since) for since, rule, layer, head in expected_callable_firings(full)
    }  # the history and the open episodes of every layer are in the checkpoint
    assert first.trained == RESUME_AT and first.published == published and not first.stops
    assert sorted(first.firings) == sorted(full.firings)  # delivered before the interruption ...
    assert not second.firings  # ... and not again: the episodes continue
    assert second.published == [s for s in trained() if s >= RESUME_AT]  # nothing published before is published again
    assert second.stops == full.stops == [stop_step()] and second.trained == full.trained
    _assert_same_scalars({**first.scalars, **second.scalars}, full.scalars)
