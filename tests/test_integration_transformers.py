"""The monitor under a real Hugging Face ``Trainer`` (tiny GPT-2 and BERT from configs, CPU), against
float64 references from the models' own eager attentions, and gradients written out by hand."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from attnmonitor.config import MonitorOptions  # noqa: E402
from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer  # noqa: E402
from tests.helpers import hf_ddp_job, hf_sharded_job  # noqa: E402
from tests.helpers.events import read_events  # noqa: E402
from tests.helpers.hf_trainer import (  # noqa: E402
    REGULARIZER,
    STATISTICS,
    Recorder,
    arguments,
    build,
    concat,
    layer_names,
    masks,
    reference_gradients,
    reference_statistics,
    samples,
    tensorboard_dir,
)
from tests.helpers.reference import head_means  # noqa: E402
from tests.helpers.reference import logged as reference_logged  # noqa: E402

HEADS = 4


def _head_values(events, stage: str, statistic: str, layer: str, step: int, prefix: str) -> torch.Tensor:
    """Logged per-head values ``[H]`` of one statistic and layer at ``step`` (TensorBoard tags of the Trainer's logs)."""
    values = []
    for head in range(HEADS):
        scalars = events.Scalars(f"{prefix}/attn_{stage}_heads/{statistic}/{layer}/head_{head}")
        values.append(next(e.value for e in scalars if e.step == step))
    return torch.tensor(values, dtype=torch.float64)


def _assert_logged_equal_reference(events, stage: str, name: str, step: int, expected: dict[str, torch.Tensor], prefix: str) -> None:
    shown = reference_logged({s: expected[s] for s in STATISTICS})
    assert not any(f"/{s}/" in tag for s in set(STATISTICS) - set(shown) for tag in events.Tags()["scalars"])  # 0 by construction
    for statistic in shown:
        for row, layer in enumerate(layer_names(name)):
            logged = _head_values(events, stage, statistic, layer, step, prefix)
            torch.testing.assert_close(logged, expected[statistic][row], rtol=1e-5, atol=1e-6, msg=f"{statistic} {layer} step {step}")


def _all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.slow
def test_gpt2_statistics_at_captured_steps_equal_eager_reference_under_gradient_accumulation(tmp_path):
    model, recorder = build("gpt2"), Recorder()
    monitor = AttentionMonitorCallback(
        capture={"statistics": STATISTICS},
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 4, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": {"every_n_steps": 4, "max_tokens": 12}, "analyses": False},
    )
    args = arguments(tmp_path, max_steps=4, gradient_accumulation_steps=2, learning_rate=1e-2)
    trainer = AttentionMonitorTrainer(model=model, args=args, train_dataset=samples("gpt2", 24), callbacks=[monitor, recorder])
    trainer.train()

    events = read_events(tensorboard_dir(trainer))
    for step in (2, 4):  # the Trainer's steps: captures of optimizer steps 1 and 3 (0-based), both micro-batches
        assert len(recorder.batches[step]) == 2
        expected = reference_statistics("gpt2", recorder.weights[step], concat(recorder.batches[step]))
        _assert_logged_equal_reference(events, "train", "gpt2", step, expected, prefix="train")
    assert recorder.weights[4]["transformer.h.0.attn.c_attn.weight"].ne(recorder.weights[2]["transformer.h.0.attn.c_attn.weight"]).any()
    assert sorted(e.step for e in events.Scalars("train/attn_train/entropy")) == [2, 4]
    # the Trainer's own log history holds them too, at its steps
    history = [entry for entry in trainer.state.log_history if "attn_train/entropy" in entry]
    assert [entry["step"] for entry in history] == [2, 4]
    assert history[-1]["attn_train/entropy"] == pytest.approx(events.Scalars("train/attn_train/entropy")[-1].value, rel=1e-6)
    # figures through the TensorBoardCallback's writer, at its step
    assert [e.step for e in events.Images("attn_train_heatmap/transformer.h.0.attn/head_0")] == [4]
    assert [e.step for e in events.Images("attn_train/atlas/entropy")] == [4]
    # hooks removed after train(), the interceptor gone
    assert _all_hooks(model) == 0 and monitor.engine.capture is None


def test_bert_evaluation_probe_with_padding_equals_eager_reference(tmp_path):
    model, recorder = build("bert"), Recorder()
    monitor = AttentionMonitorCallback(
        capture={"statistics": STATISTICS},
        schedule={"every_n_steps": 1, "val_batches": 1, "atlas_every_n_steps": 100},
        dashboards={"per_head": True, "heatmaps": {"every_n_steps": None, "max_tokens": 12}, "analyses": False},
    )
    args = arguments(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, learning_rate=1e-2)
    data = samples("bert", 12)
    trainer = AttentionMonitorTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:6], callbacks=[monitor, recorder])
    trainer.train()

    events = read_events(tensorboard_dir(trainer))
    batch = recorder.eval_batches[2]
    assert batch["attention_mask"].sum(1).tolist() == [2, 7, 12]  # the first evaluation batch, padded on the right
    expected = reference_statistics("bert", recorder.eval_weights[2], batch)
    _assert_logged_equal_reference(events, "val", "bert", 2, expected, prefix="eval")
    step1 = reference_statistics("bert", recorder.weights[1], concat(recorder.batches[1]))
    _assert_logged_equal_reference(events, "train", "bert", 1, step1, prefix="train")
    assert any("eval_attn_val/entropy" in entry and entry["step"] == 2 for entry in trainer.state.log_history)
    images = events.Tags()["images"]
    assert "attn_val/atlas/entropy" in images and "attn_val_heatmap/bert.encoder.layer.0.attention.self/head_0" in images
    assert "attn_val/table/text_summary" in events.Tags()["tensors"]
    assert _all_hooks(model) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_regularizer_gradients_equal_hand_written_task_plus_penalty(tmp_path, name):
    # GPT-2: the Trainer normalises the task loss over the accumulated batch (num_items_in_batch) and does not
    # divide it by the accumulation steps; BERT (loss_is_scaled_for_ga=False): a per-batch mean it divides.
    model, recorder = build(name, dtype=torch.float64), Recorder()
    monitor = AttentionMonitorCallback(
        regularizer=REGULARIZER, schedule={"every_n_steps": 1, "val_batches": 0}, dashboards={"heatmaps": None, "analyses": False}
    )
    args = arguments(tmp_path, max_steps=2, gradient_accumulation_steps=2, report_to=[])
    trainer = AttentionMonitorTrainer(model=model, args=args, train_dataset=samples(name, 12), callbacks=[monitor, recorder])
    if name == "bert":
        trainer.loss_is_scaled_for_ga = False
    trainer.train()

    for step in (1, 2):
        expected = reference_gradients(name, recorder.weights[step], recorder.batches[step])
        task_only = reference_gradients(name, recorder.weights[step], recorder.batches[step], penalty=False)
        assert set(recorder.grads[step]) == set(expected)
        assert max(float((expected[p] - task_only[p]).abs().max()) for p in expected) > 1e-5  # the penalty matters (100x atol)
        for param, grad in expected.items():  # (the Trainer's causal-LM loss upcasts logits to float32 only)
            torch.testing.assert_close(recorder.grads[step][param], grad, rtol=1e-6, atol=1e-7, msg=param)
    logged = [entry for entry in trainer.state.log_history if "attn_reg/penalty" in entry]
    assert [entry["step"] for entry in logged] == [1, 2] and all(entry["attn_reg/entropy"] > 0 for entry in logged)


def test_clipping_applies_inside_the_trainer_forward(tmp_path):
    model, recorder = build("bert"), Recorder()
    with torch.no_grad():  # peaked attention: without clipping, rows put most of their weight on one key
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(20)
            layer.attention.self.key.weight.mul_(20)
    monitor = AttentionMonitorCallback(
        clip={"max": 0.5},
        capture={"statistics": ["max_weight"]},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"heatmaps": None, "analyses": False},
    )
    trainer = AttentionMonitorTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1, report_to=[], learning_rate=0.0),
        train_dataset=samples("bert", 6),
        callbacks=[monitor, recorder],
    )
    trainer.train()
    unclipped = reference_statistics("bert", recorder.weights[1], concat(recorder.batches[1]))["max_weight"].mean()
    entry = next(entry for entry in trainer.state.log_history if "attn_train/max_weight" in entry)
    assert unclipped > 0.6 and entry["attn_train/max_weight"] <= 0.5 + 1e-6  # every row has >= 2 keys: the cap is feasible
    clipped = next(entry for entry in trainer.state.log_history if "attn_reg/clip_fraction" in entry)
    assert 0 < clipped["attn_reg/clip_fraction"] < 1


def test_a_plain_trainer_binds_the_monitor_and_refuses_a_regularizer(tmp_path):
    args = arguments(tmp_path, max_steps=1, report_to=[])
    data = samples("gpt2", 6)
    with pytest.raises(ValueError, match="AttentionMonitorMixin"):
        AttentionMonitorCallback(regularizer=REGULARIZER).bind(transformers.Trainer(model=build("gpt2"), args=args, train_dataset=data))
    with pytest.raises(ValueError, match="transformers.Trainer"):
        AttentionMonitorCallback().bind(object())  # type: ignore[arg-type]

    unbound = transformers.Trainer(model=build("gpt2"), args=args, train_dataset=data, callbacks=[AttentionMonitorCallback()])
    with pytest.raises(RuntimeError, match="not bound"):
        unbound.train()

    model = build("gpt2")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    monitor = AttentionMonitorCallback(
        MonitorOptions(schedule={"every_n_steps": 1}, dashboards={"heatmaps": None, "analyses": False})
    ).bind(trainer)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("AttentionMonitorCallback") == names.index("DefaultFlowCallback") + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no images requested: no warning about TensorBoard
        warnings.filterwarnings("ignore", "attnmonitor: no atlases in this 1-step run", RuntimeWarning)  # tests/test_new_user.py
        trainer.train()
    assert any("attn_train/entropy" in entry for entry in trainer.state.log_history)
    assert monitor.engine.capture is None and _all_hooks(model) == 0


def test_hooks_are_removed_when_training_fails(tmp_path):
    model = build("gpt2")

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    monitor = AttentionMonitorCallback(schedule={"every_n_steps": 1}, dashboards={"heatmaps": None, "analyses": False})
    trainer = AttentionMonitorTrainer(
        model=model, args=arguments(tmp_path, max_steps=3, report_to=[]), train_dataset=samples("gpt2", 9), callbacks=[monitor, Boom()]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert monitor.engine.capture is None and _all_hooks(model) == 0


def test_targets_matching_no_module_fail_before_the_first_step(tmp_path):
    monitor = AttentionMonitorCallback(capture={"targets": r"nothing\.here"})
    trainer = AttentionMonitorTrainer(
        model=build("gpt2"), args=arguments(tmp_path, max_steps=1, report_to=[]), train_dataset=samples("gpt2", 3), callbacks=[monitor]
    )
    with pytest.raises(ValueError, match="targets"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", hf_ddp_job.__file__, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    assert len(runs) == 1, runs  # only the main process writes
    events = read_events(runs.pop())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    weights = build("gpt2").state_dict()  # step 1 starts from the initial weights on both ranks
    train = concat([batch for rank in ranks for batch in rank["train"]])
    assert len(train["input_ids"]) == 2 * hf_ddp_job.BATCH  # two different halves of the global batch
    assert len({tuple(rank["train"][0]["input_ids"][0].tolist()) for rank in ranks}) == 2
    _assert_logged_equal_reference(events, "train", "gpt2", 1, reference_statistics("gpt2", weights, train), prefix="train")
    evaluation = concat([rank["eval"] for rank in ranks])
    assert not torch.equal(ranks[0]["eval"]["input_ids"], ranks[1]["eval"]["input_ids"])  # the evaluation set is sharded
    trained = ranks[0]["eval_weights"]
    _assert_logged_equal_reference(events, "val", "gpt2", 1, reference_statistics("gpt2", trained, evaluation), prefix="eval")


def _tiny_llama(path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


@pytest.mark.slow
def test_fsdp2_sharded_by_transformers_equals_one_process(tmp_path):
    """The Trainer on a Llama sharded by ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``:
    FSDP2 ``Shard(0)`` parameters, each process its own data; logged per-head statistics equal the float64
    eager attentions of one process over the global batch."""
    _tiny_llama(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    job = [hf_sharded_job.__file__, str(tmp_path / "model"), str(tmp_path / "out"), "fsdp"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *job]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    assert all(rank["sharded"] and rank["placements"] == "(Shard(dim=0),)" for rank in ranks)
    batch = concat([micro for rank in ranks for micro in rank["train"]])
    assert len(batch["input_ids"]) == 2 * hf_sharded_job.BATCH and not torch.equal(
        ranks[0]["train"][0]["input_ids"], ranks[1]["train"][0]["input_ids"]
    )
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager", dtype=torch.float64)
    with torch.no_grad():
        attentions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True).attentions
    key_valid, query_valid = masks("gpt2", batch["attention_mask"])  # causal and padded, as GPT-2's
    (logs,) = ranks[0]["logs"]
    for i, probs in enumerate(attentions):
        expected = head_means(probs, key_valid, query_valid)
        for statistic in reference_logged({s: expected[s] for s in STATISTICS}):
            for h in range(HEADS):
                logged = logs[f"attn_train_heads/{statistic}/model.layers.{i}.self_attn/head_{h}"]
                assert logged == pytest.approx(float(expected[statistic][h]), rel=1e-5, abs=1e-6), (i, statistic, h)


def test_the_hf_trainer_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_example", Path(__file__).parents[1] / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--max-steps", "4", "--every-n-steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path)])
    assert [entry["step"] for entry in trainer.state.log_history if "attn_train/entropy" in entry] == [2, 4]
    events = read_events(tensorboard_dir(trainer))
    assert [e.step for e in events.Scalars("train/attn_train/entropy")] == [2, 4]


def test_an_alarm_with_action_stop_saves_and_stops_the_trainer_and_qk_clip_rescales(tmp_path, caplog):
    """Every head's max_logit is above a ceiling of 0: a warning at the first capture, whose action is
    "stop": the Trainer saves a checkpoint there and stops; QK-clip (tau below every head at first) runs
    after every step."""
    model = build("gpt2")
    query_before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    growth = {"ceiling": 0.0, "factor": 1e9, "span": 4}
    monitor = AttentionMonitorCallback(
        qk_clip={"tau": 1e-3},
        alarms={"entropy_collapse": None, "sink_jump": None, "logit_growth": growth, "actions": {"warning": "stop"}, "every_n_steps": 1},
        schedule={"every_n_steps": 5, "val_batches": 0},
        dashboards={"heatmaps": None, "analyses": False},
    )
    trainer = AttentionMonitorTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=6, report_to=[], learning_rate=0.0),  # save_strategy "no"
        train_dataset=samples("gpt2", 30),
        callbacks=[monitor],
    )
    with caplog.at_level(logging.WARNING, logger="attnmonitor"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "attnmonitor"]
    assert lines[0].startswith("attnmonitor alarm [warning] logit_growth at step 1: max_logit of transformer.h.0.attn heads 0, 1, 2, 3 (")
    assert trainer.state.global_step == 1  # stopped after the step the alarm fired at (the Trainer's step 1)
    assert (tmp_path / "checkpoint-1").is_dir()
    clipped = [entry["attn_reg/qk_clipped_heads"] for entry in trainer.state.log_history if "attn_reg/qk_clipped_heads" in entry]
    assert clipped == [8.0]  # after the step: 2 layers x 4 heads
    d = 32
    query_after = model.transformer.h[0].attn.c_attn.weight.detach()
    assert (query_after[:, : 2 * d].abs() < query_before[:, : 2 * d].abs() * 0.5).all()  # queries and keys shrunk
    assert torch.equal(query_after[:, 2 * d :], query_before[:, 2 * d :])  # values untouched
