"""Hydra composition of every config and preset, the main job end to end, multirun, live TensorBoard."""

import dataclasses
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from attnmonitor import AttentionMonitor, HeatmapConfig
from attnmonitor.config import AttentionMonitorConfig, MonitorOptions, register_configs
from attnmonitor.regularization import RegularizerConfig
from tests.helpers.events import read_events, read_hparams

EXPERIMENTS = [None, "reverse", "minilm", "regularized", "unstable", "reverse_unstable"]
FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0"]


def _compose(overrides=()):
    register_configs()
    with initialize_config_module(config_module="attnmonitor.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _no_omegaconf(value, path="monitor"):
    assert not isinstance(value, (DictConfig, ListConfig)), path
    if isinstance(value, dict):
        for key, item in value.items():
            _no_omegaconf(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _no_omegaconf(item, f"{path}[{i}]")


def test_structured_config_mirrors_every_callback_option():
    fields = set(OmegaConf.structured(AttentionMonitorConfig)) - {"_target_"}
    assert fields == {f.name for f in dataclasses.fields(MonitorOptions)}  # the options every adapter shares
    yaml_keys = set(_compose().callbacks.attention_monitor) - {"_target_"}
    assert yaml_keys == fields  # the YAML lists every option


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_composes_and_instantiates_plain_python(experiment):
    cfg = _compose([f"experiment={experiment}"] if experiment else [])
    for group in ("model", "data", "trainer", "logger"):
        assert "_target_" in cfg[group], group
    monitor = instantiate(cfg.callbacks.attention_monitor, _convert_="all")
    assert isinstance(monitor, AttentionMonitor) and isinstance(monitor.options.dashboards.heatmaps, HeatmapConfig)
    _no_omegaconf(vars(monitor))
    _no_omegaconf(vars(monitor.options))
    _no_omegaconf(vars(monitor.engine.regularizer))
    restored = pickle.loads(pickle.dumps(monitor))
    assert restored.options == monitor.options
    if experiment == "regularized":
        assert isinstance(monitor.engine.regularizer.regularizer, RegularizerConfig)
        assert monitor.engine.regularizer.regularizing and monitor.engine.regularizer.clip.max == 0.6
    if experiment == "unstable":
        assert monitor.options.alarms.every_n_steps == 10 and monitor.options.qk_clip is None


def test_qk_clip_is_switched_on_by_its_tau_from_the_command_line():
    assert instantiate(_compose().callbacks.attention_monitor).options.qk_clip is None
    cfg = _compose(["callbacks.attention_monitor.qk_clip.tau=100", "callbacks.attention_monitor.qk_clip.layers=[blocks\\.0\\..*]"])
    options = instantiate(cfg.callbacks.attention_monitor, _convert_="all").options
    assert (options.qk_clip.tau, options.qk_clip.layers, options.qk_clip.projections) == (100.0, ["blocks\\.0\\..*"], {})


def test_unstable_preset_warms_the_learning_rate_up_to_its_peak():
    cfg = _compose(["experiment=unstable"])
    model = instantiate(cfg.model, vocab_size=10)
    optimizers = model.configure_optimizers()
    optimizer, ramp = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(cfg.model.warmup_steps + 2):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        ramp.step()
    assert rates[0] == pytest.approx(0.5 / 200) and rates[99] == pytest.approx(0.25) and rates[199:] == pytest.approx([0.5] * 3)


@pytest.mark.parametrize(
    "override,match",
    [
        ("callbacks.attention_monitor.every_n_step=3", "every_n_step"),
        ("callbacks.attention_monitor.schedule.every_n_steps=often", "every_n_steps"),
        ("callbacks.attention_monitor.dashboards.heatmaps.max_token=3", "max_token"),
        ("callbacks.attention_monitor.regularizer.entropy_weight=heavy", "entropy_weight"),
    ],
)
def test_misspelt_keys_and_wrong_types_fail_at_composition(override, match):
    with pytest.raises(ConfigCompositionException, match=match):
        _compose([override])


@pytest.mark.parametrize(
    "override,match",
    [
        ("callbacks.attention_monitor.capture.statistics=[entropy,perplexity]", r"`capture.statistics`.*'perplexity'"),
        ("callbacks.attention_monitor.regularizer.entropy_weight=-0.5", "`regularizer.entropy_weight` must be a number >= 0"),
        ("callbacks.attention_monitor.clip.min=0.6 callbacks.attention_monitor.clip.max=0.2", "`clip` needs 0 <= min <= max <= 1"),
        ("callbacks.attention_monitor.schedule.every_n_steps=0", "`schedule.every_n_steps` must be an int >= 1"),
    ],
)
def test_semantic_errors_fail_before_training_naming_the_option(override, match):
    cfg = _compose(override.split())
    with pytest.raises(Exception, match=match):
        instantiate(cfg.callbacks.attention_monitor, _convert_="all")


def _run(args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "attnmonitor.train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_runs_end_to_end(tmp_path, experiment):
    args = [f"hydra.run.dir={tmp_path}/run", *FAST] + ([f"experiment={experiment}"] if experiment else [])
    result = _run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tensorboard --logdir {tmp_path}/run" in result.stdout
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events


@pytest.mark.slow
def test_multirun_writes_each_job_to_its_own_directory(tmp_path):
    args = ["-m", "callbacks.attention_monitor.regularizer.entropy_weight=0,0.01,0.1", f"hydra.sweep.dir={tmp_path}/sweep", *FAST]
    result = _run(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.parent.name for p in (tmp_path / "sweep").glob("*/tensorboard/events.out.tfevents.*"))
    assert runs == ["0", "1", "2"]
    configs = [OmegaConf.load(tmp_path / "sweep" / r / ".hydra" / "config.yaml") for r in runs]
    weights = [config.callbacks.attention_monitor.regularizer.entropy_weight for config in configs]
    assert weights == [0, 0.01, 0.1]
    # the HParams tab tells the jobs apart: each job's whole config, the swept value included
    hparams = [read_hparams(tmp_path / "sweep" / r / "tensorboard") for r in runs]
    assert [h["callbacks/attention_monitor/regularizer/entropy_weight"] for h in hparams] == [0, 0.01, 0.1]
    assert all(h["attnmonitor/schedule/every_n_steps"] == 50 and h["trainer/max_steps"] == 4 for h in hparams)
    assert all("hp_metric" not in read_events(tmp_path / "sweep" / r / "tensorboard").Tags()["scalars"] for r in runs)


@pytest.mark.slow
def test_the_job_says_where_its_logs_are_before_training_and_at_the_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    overrides = [f"hydra.run.dir={tmp_path}/run", *FAST, "callbacks.attention_monitor.schedule.every_n_steps=2"]
    command = [sys.executable, "-m", "attnmonitor.train", *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    output = result.stdout
    line = f"tensorboard --logdir {tmp_path}/run"
    assert output.count(line) == 2
    keep = int(re.search(rf"{re.escape(line)} --samples_per_plugin images=(\d+)", output).group(1))
    events = read_events(tmp_path / "run" / "tensorboard")
    written = max(len(events.Images(tag)) for tag in events.Tags()["images"])
    assert written <= keep  # TensorBoard keeps every image the run wrote
    assert output.index(line) < output.index("Step (epoch 0)")  # printed before the progress bar's first step
    assert "Tip:" not in output and "LeafSpec" not in output  # Lightning's tips and known noise are not printed
    assert "attn H" in output  # the progress bar shows the monitor's mean normalised entropy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        return json.loads(response.read())


@pytest.mark.slow
def test_a_running_tensorboard_shows_attention_scalars_before_the_run_ends(tmp_path):
    run_dir = tmp_path / "run"
    training = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "attnmonitor.train",
            f"hydra.run.dir={run_dir}",
            "trainer.max_steps=5000",
            "callbacks.attention_monitor.schedule.every_n_steps=5",
            "trainer.val_check_interval=1000",
            "trainer.num_sanity_val_steps=0",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        values = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and values is None:
            time.sleep(1)
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
            except OSError:
                continue
            for run, run_tags in tags.items():
                if "attn_train/entropy" in run_tags:
                    query = urllib.parse.urlencode({"run": run, "tag": "attn_train/entropy"})
                    values = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert values, "TensorBoard never served attn_train/entropy"
        assert training.poll() is None, "the run ended before TensorBoard showed its attention scalars"
        steps = [step for _, step, _ in values]
        assert steps[0] == 4 and all((s + 1) % 5 == 0 for s in steps)  # steps 4, 9, ...: one in five
        assert all(value > 0 for _, _, value in values)
    finally:
        for process in (training, server):
            process.terminate()
            process.wait(timeout=30)


def test_configs_folder_at_the_top_level_is_the_packaged_one():
    root = Path(__file__).resolve().parents[1]
    assert (root / "configs" / "train.yaml").resolve() == (root / "attnmonitor" / "configs" / "train.yaml").resolve()


def test_a_single_statistic_or_layer_pattern_is_accepted_on_the_command_line_as_in_python():
    overrides = [
        "callbacks.attention_monitor.capture.statistics=entropy",
        r"callbacks.attention_monitor.dashboards.heatmaps.layers=blocks\.0\..*",
        "callbacks.attention_monitor.alarms=null",  # the alarms read other statistics
    ]
    monitor = instantiate(_compose(overrides).callbacks.attention_monitor, _convert_="all")
    assert monitor.options.capture.statistics == ["entropy"]
    assert monitor.options.dashboards.heatmaps.layers == [r"blocks\.0\..*"]
    with pytest.raises(Exception, match=r"`capture.statistics` got unknown \['entropi'\]"):
        instantiate(_compose(["callbacks.attention_monitor.capture.statistics=entropi"]).callbacks.attention_monitor, _convert_="all")


@pytest.mark.slow
def test_the_main_job_resumes_from_its_checkpoint_with_its_steps_and_alarm_history(tmp_path):
    every2 = [
        "trainer.val_check_interval=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.attention_monitor.schedule.every_n_steps=2",
        "callbacks.attention_monitor.alarms.every_n_steps=2",
    ]
    first = _run([f"hydra.run.dir={tmp_path}/first", "trainer.max_steps=4", *every2], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "first" / "tensorboard" / "checkpoints" / "last.ckpt"
    assert f"attnmonitor-train ckpt_path={last}" in first.stdout  # the job says how to resume
    resumed = _run([f"hydra.run.dir={tmp_path}/resumed", f"ckpt_path={last}", "trainer.max_steps=6", *every2], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e.step for e in read_events(tmp_path / "resumed" / "tensorboard").Scalars("attn_train/entropy")] == [5]  # steps go on
    import torch

    checkpoint = torch.load(tmp_path / "resumed" / "tensorboard" / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("AttentionMonitor")]
    assert checkpoint["global_step"] == 6 and state["last_train_step"] == 5
    assert state["alarms"]["history"]["blocks.0.attn"]["steps"] == [1, 3, 5]  # the first run's captures kept
