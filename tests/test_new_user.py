"""What a new user hits first: the monitor's numbers where Lightning callbacks read metrics, mistakes
caught at construction in one short message, and setups that would log nothing warned about."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import AttentionMonitor
from attnmonitor.demo import TinyGPT
from tests.helpers.events import read_events
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer

VOCAB, SEQ = 40, 12
pytestmark = [ignore_few_batches, ignore_no_validation_data]


def _loader(n: int = 24, seed: int = 0) -> DataLoader:
    ids = torch.randint(VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, seq_len=SEQ, dim=16, layers=2, heads=2, lr=1e-2)


def test_model_checkpoint_and_early_stopping_can_monitor_attention(tmp_path):
    monitor = AttentionMonitor(capture={"statistics": ["normalized_entropy"]}, schedule={"every_n_steps": 2})
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", monitor="attn_val/normalized_entropy", mode="max", save_top_k=1)
    stopping = EarlyStopping(monitor="attn_val/normalized_entropy", mode="max", patience=100)
    trainer = make_trainer(
        tmp_path, [monitor, checkpoint, stopping], max_steps=6, val_check_interval=3, limit_val_batches=2, enable_checkpointing=True
    )
    trainer.fit(_model(), _loader(), _loader(n=8, seed=1))
    events = read_events(tmp_path / "tb" / "version_0")
    validations = {e.step: e.value for e in events.Scalars("attn_val/normalized_entropy")}
    assert len(validations) == 2
    assert float(checkpoint.best_model_score) == pytest.approx(max(validations.values()), rel=1e-6)
    assert float(stopping.best_score) == pytest.approx(max(validations.values()), rel=1e-6)
    last_train = {e.step: e.value for e in events.Scalars("attn_train/normalized_entropy")}
    assert float(trainer.callback_metrics["attn_train/normalized_entropy"]) == pytest.approx(last_train[max(last_train)], rel=1e-6)
    assert "attn_train/normalized_entropy" in trainer.logged_metrics


@pytest.mark.parametrize("tokenizer", [None, lambda ids: ["the" if i % 2 else f"w{i}" for i in ids]])
def test_token_class_shares_are_logged_only_with_a_tokenizer(tmp_path, tokenizer):
    monitor = AttentionMonitor(
        capture={"statistics": ["entropy"]},
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 2, "val_batches": 0},
        dashboards={"tokenizer": tokenizer, "heatmaps": {"every_n_steps": 2}},
    )
    make_trainer(tmp_path, [monitor], max_steps=2, limit_val_batches=0).fit(_model(), _loader())
    scalars = read_events(tmp_path / "tb" / "version_0").Tags()["scalars"]
    shares = sorted(t for t in scalars if t.startswith("attn_train_example/") and t.split("/")[1].endswith("_share"))
    assert "attn_train_example/diversity/blocks.0.attn" in scalars  # the analyses ran
    if tokenizer is None:  # ids are never function words: no content/function shares
        assert shares == []
    else:
        assert shares == [f"attn_train_example/{c}_share/blocks.{i}.attn" for c in ("content", "function") for i in (0, 1)]


def test_a_schedule_no_step_of_the_run_reaches_is_warned_at_the_start(tmp_path):
    monitor = AttentionMonitor(schedule={"every_n_steps": 100, "val_batches": 0})
    with pytest.warns(
        RuntimeWarning, match=r"no training step of this 12-step run is captured: `schedule.every_n_steps=100` \(use at most 12\)"
    ):
        make_trainer(tmp_path, [monitor], max_steps=12, limit_val_batches=0).fit(_model(), _loader(n=48))


def test_a_schedule_that_fits_the_run_is_not_warned_about(tmp_path, recwarn):
    monitor = AttentionMonitor(schedule={"every_n_steps": 2, "atlas_every_n_steps": 4, "val_batches": 0}, dashboards={"heatmaps": None})
    make_trainer(tmp_path, [monitor], max_steps=4, limit_val_batches=0).fit(_model(), _loader())
    assert not [w for w in recwarn if "attnmonitor: no " in str(w.message)]


def test_the_lightning_callback_given_to_a_hugging_face_trainer_names_the_one_to_use(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer

    from tests.helpers.hf_trainer import arguments, build, samples

    with pytest.raises(
        TypeError,
        match=r"`AttentionMonitor` is the Lightning callback; .* takes `attnmonitor.integrations.transformers.AttentionMonitorCallback`",
    ):
        Trainer(
            model=build("gpt2"), args=arguments(tmp_path, max_steps=2), train_dataset=samples("gpt2", 4), callbacks=[AttentionMonitor()]
        )


def test_messages_name_the_accepted_values_exactly():
    with pytest.raises(ValueError, match=r"^`alarms` must be an AlarmsConfig, a mapping or None, got bool$"):
        AttentionMonitor(alarms=True)
    for tau in (-1, 0):  # the range stated is the range accepted
        with pytest.raises(ValueError, match=rf"^`qk_clip.tau` must be a number in \(0.0, inf\) or None, got {tau}$"):
            AttentionMonitor(qk_clip={"tau": tau})
    assert AttentionMonitor(qk_clip={"tau": 1e-3}).options.qk_clip.tau == 1e-3


@pytest.mark.parametrize("disable_tqdm", [True, False])  # PrinterCallback, ProgressCallback
def test_the_hugging_face_console_leaves_the_monitors_scalars_out(tmp_path, capsys, disable_tqdm):
    pytest.importorskip("accelerate")
    from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer
    from tests.helpers.hf_trainer import arguments, build, samples

    monitor = AttentionMonitorCallback(schedule={"every_n_steps": 1, "val_batches": 0}, dashboards={"heatmaps": None, "analyses": False})
    args = arguments(tmp_path, max_steps=2, logging_steps=1, report_to=[], disable_tqdm=disable_tqdm)
    trainer = AttentionMonitorTrainer(model=build("gpt2"), args=args, train_dataset=samples("gpt2", 4), callbacks=[monitor])
    trainer.train()
    printed = capsys.readouterr()
    assert "attn_train" not in printed.out + printed.err
    assert "'loss'" in printed.out + printed.err  # the Trainer's own lines are still printed
    assert any("attn_train/entropy" in entry for entry in trainer.state.log_history)  # and the logs keep them


def test_a_step_bounded_run_shows_its_steps_out_of_max_steps_across_epochs(tmp_path, capsys):
    from attnmonitor.integrations.lightning import AttentionProgressBar

    monitor = AttentionMonitor(schedule={"every_n_steps": 2, "val_batches": 0}, dashboards={"heatmaps": None})
    trainer = make_trainer(tmp_path, [monitor, AttentionProgressBar()], max_steps=10, limit_val_batches=0, enable_progress_bar=True)
    trainer.fit(_model(), _loader())  # 6 batches per epoch: two epochs
    printed = capsys.readouterr()
    bars = (printed.out + printed.err).replace("\r", "\n").splitlines()
    shown = [line for line in bars if line.startswith("Step (epoch")]
    assert shown and "10/10" in shown[-1] and "Step (epoch 1)" in shown[-1], shown[-3:]
    assert not any("/6 [" in line for line in shown)  # never batches out of an epoch's 6
    assert "attn H" in shown[-1]


@pytest.mark.slow
def test_the_example_script_says_where_its_logs_are_first_and_prints_no_known_noise(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "train_tiny_gpt.py"
    command = [sys.executable, str(script), "--max-steps", "4", "--log-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    output = result.stdout
    assert output.index(f"tensorboard --logdir {tmp_path / 'runs'}") < output.index("Step (epoch 0)")
    assert "Tip:" not in output and "LeafSpec" not in output and "does not have many workers" not in output
    assert "no training step of this 4-step run is captured" in output  # the short run is told so
    assert list((tmp_path / "runs" / "tiny_gpt").glob("version_0/events.out.tfevents.*"))


def test_the_example_is_the_batch_row_with_most_distinct_tokens_not_a_rule_line(tmp_path):
    from attnmonitor.batch import example_row

    ids = torch.randint(VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(3))
    ids[0] = 7  # a row of one repeated token, as a ReST rule line "- - - -"
    assert example_row((ids[:, :-1],), "input_ids") == int((ids[:, :-1].sort(1).values.diff(1) != 0).sum(1).argmax()) != 0
    val = DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)
    monitor = AttentionMonitor(
        capture={"statistics": ["entropy"]},
        schedule={"every_n_steps": 100, "val_batches": 1},
        dashboards={"tokenizer": lambda xs: [f"t{int(x)}" for x in xs], "heatmaps": {"every_n_steps": None}},
    )
    make_trainer(tmp_path, [monitor], max_steps=2, val_check_interval=2, limit_val_batches=1).fit(_model(), _loader(), val)
    events = read_events(tmp_path / "tb" / "version_0")
    table = events.Tensors("attn_val_example/interpretation/blocks.0.attn/text_summary")[0].tensor_proto.string_val[0].decode()
    row = example_row((ids[:, :-1],), "input_ids")
    queries = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")][2:]
    assert queries == [f"t{int(x)}" for x in ids[row, :-1]]  # the varied row, labelled by its own tokens


@pytest.mark.slow
def test_the_hugging_face_example_shows_a_readable_example_and_a_quiet_console(tmp_path, capsys, monkeypatch):
    pytest.importorskip("accelerate")
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    import hf_trainer

    sys.modules.pop("hf_trainer", None)
    trainer = hf_trainer.main(["--max-steps", "10", "--every-n-steps", "2", "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr()
    assert "attn_" not in printed.out and printed.out.index("tensorboard --logdir") < printed.out.index("'loss'")
    assert any("eval_attn_val/entropy" in entry for entry in trainer.state.log_history)
    (run,) = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    table = read_events(run).Tensors("attn_val_example/interpretation/transformer.h.0.attn/text_summary")[-1]
    queries = [line.split("|")[1].strip() for line in table.tensor_proto.string_val[0].decode().splitlines() if line.startswith("|")][2:]
    assert len(set(queries)) > len(queries) // 2  # words of a sentence, not a rule line of "-"
