"""QK-clip: after the rescale, the same batch's per-head ``max_logit`` is at most tau (the clipped heads
exactly tau), the other heads and every other parameter are untouched, on many architectures."""

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from attnmonitor import AttentionCapture, AttentionMonitor
from attnmonitor.capture.discovery import resolve_targets
from attnmonitor.config import MonitorOptions, QKClipConfig
from attnmonitor.demo import TinyGPT
from attnmonitor.interventions.qk_clip import QKClip, clip_factors
from tests.helpers.events import read_events
from tests.helpers.models import SdpaAttention, TinyTransformer
from tests.helpers.trainer import ignore_few_batches, ignore_no_validation_data, make_trainer

QK_NAMES = ("q_proj", "k_proj", "query", "key", "q_lin", "k_lin", "c_attn", "qkv", "Wqkv", ".q.", ".k.")
"""Parameter names of query and key projections (recognised layouts; the test models' ``q``/``k``)."""


def max_logits(model: nn.Module, inputs: dict, replay: dict | None = None) -> dict[str, torch.Tensor]:
    """``{layer: [H]}`` max logit of one forward (``max_logit`` itself is tested against float64 in
    test_max_logit.py). ``replay``: each attention module's inputs of an earlier forward, fed to it again
    (a clip of layer 0 changes the input of layer 1: each layer is compared on its own inputs)."""
    pending = {module: iter(calls) for module, calls in (replay or {}).items()}
    handles = [m.register_forward_pre_hook(lambda m, args, kwargs: next(pending[m]), with_kwargs=True) for m in pending]
    try:
        with AttentionCapture(model, statistics=["max_logit"]) as cap, torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: stats["max_logit"] for layer, stats in cap.layer_stats().items()}


def recorded_inputs(model: nn.Module, inputs: dict, layers: list[str]) -> dict[nn.Module, list]:
    """``{attention module: [(args, kwargs) of each call]}`` of one forward."""
    modules = {model if layer == type(model).__name__ else model.get_submodule(layer.split("#")[0]) for layer in layers}
    calls: dict[nn.Module, list] = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda m, a, k: calls[m].append((a, k)), with_kwargs=True) for m in modules]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return calls


def clip_once(model: nn.Module, inputs: dict, **config) -> tuple[float, dict, dict, dict]:
    """Clip at tau = the median head of one forward; returns tau, the maxima before and after (each
    layer on its inputs of before), and the parameters before."""
    before = max_logits(model, inputs)
    tau = float(torch.cat(list(before.values())).median())
    replay = recorded_inputs(model, inputs, list(before))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    clip = QKClip(QKClipConfig(tau=tau, **config), model, resolve_targets(model))
    clipped = clip.apply(before)
    assert clipped == sum(int((v > tau).sum()) for v in module_maxima(before).values()) > 0
    return tau, before, max_logits(model, inputs, replay), params


def module_maxima(before: dict) -> dict[str, torch.Tensor]:
    """``{module: [H]}``: a module called several times per forward (ALBERT's ``name#i``) by its largest call."""
    maxima: dict[str, torch.Tensor] = {}
    for layer, values in before.items():
        name = layer.split("#")[0]
        maxima[name] = torch.maximum(maxima[name], values) if name in maxima else values
    return maxima


def assert_clipped(tau: float, before: dict, after: dict, exact_others: bool = True) -> None:
    """Each head's logits are scaled by tau / (its module's max logit) when that exceeds tau: heads over
    tau now peak at tau; the others peak where they did (bit for bit when ``exact_others``)."""
    maxima = module_maxima(before)
    for layer, old in before.items():
        new, peak = after[layer], maxima[layer.split("#")[0]]
        over = peak > tau
        expected = torch.where(over, old * tau / peak, old)
        assert torch.allclose(new[over], expected[over], rtol=1e-5), (layer, old, new)
        assert (new <= tau * (1 + 1e-5)).all(), (layer, new)
        if exact_others:
            assert torch.equal(new[~over], old[~over]), (layer, old, new)
        else:
            assert torch.allclose(new[~over], old[~over], rtol=1e-5), (layer, old, new)


def assert_only_qk_changed(model: nn.Module, params: dict) -> None:
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, params[name])]
    assert changed and all(any(q in name for q in QK_NAMES) for name in changed), changed


# ------------------------------------------------------------------------------------------------
# factors


def test_factors_multi_head_and_grouped_query():
    m = torch.tensor([400.0, 50.0, 100.0, float("nan")])
    query, key = clip_factors(m, 100.0, kv_heads=4)
    assert torch.allclose(query, torch.tensor([0.5, 1.0, 1.0, 1.0])) and torch.allclose(key, query)
    assert torch.equal(query[1:], torch.ones(3))  # at or under tau, or unseen: exactly 1
    # two query heads per key head: the group (400, 50) shrinks its key by sqrt(1/4); head 1's query grows back
    query, key = clip_factors(m, 100.0, kv_heads=2)
    assert torch.allclose(key, torch.tensor([0.5, 1.0]))
    assert torch.allclose(query * key.repeat_interleave(2), torch.tensor([0.25, 1.0, 1.0, 1.0]))


# ------------------------------------------------------------------------------------------------
# architectures


@pytest.mark.filterwarnings("ignore:attnmonitor. the padding of the queries of cross-attention")
def test_torch_multihead_attention_packed_and_separate_projections():
    for kdim in (None, 6):
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(8, 4, batch_first=True, kdim=kdim, vdim=kdim)
        x = torch.randn(3, 5, 8) * 3
        kv = x if kdim is None else torch.randn(3, 7, kdim) * 3
        tau, before, after, params = clip_once(mha, dict(query=x, key=kv, value=kv))
        assert_clipped(tau, before, after)
        changed = {name for name, p in mha.named_parameters() if not torch.equal(p, params[name])}
        assert changed <= {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight"}, changed
        weight = "in_proj_weight" if kdim is None else "q_proj_weight"
        over = before["MultiheadAttention"] > tau
        query_rows = mha.get_parameter(weight).detach()[:8].view(4, 2, -1)  # [heads, head_dim, in]
        assert torch.equal(query_rows[~over], params[weight][:8].view(4, 2, -1)[~over])  # unclipped heads: bit for bit
        assert torch.equal(mha.out_proj.weight, params["out_proj.weight"])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_heads_keep_their_own_factor(kv_heads):
    torch.manual_seed(0)
    model = TinyTransformer(SdpaAttention, dim=16, heads=4, kv_heads=kv_heads, dropout=0.0)
    for layer in model.layers:  # spread the heads' logits
        layer.q.weight.data *= torch.linspace(0.5, 4, 16)[:, None]
    tau, before, after, params = clip_once(model, dict(input_ids=torch.randint(50, (3, 9))))
    assert_clipped(tau, before, after, exact_others=kv_heads == 4)
    assert_only_qk_changed(model, params)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_demo_gpt_fused_qkv(impl):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=50, seq_len=16, dim=32, layers=2, heads=4)
    ids = torch.randint(50, (4, 16))
    tau, before, after, params = clip_once(model, dict(input_ids=ids))
    assert_clipped(tau, before, after)
    assert_only_qk_changed(model, params)
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"):
        values = model.get_parameter(name)[64:]  # the value third
        assert torch.equal(values, params[name][64:])


HF_FAMILIES = [
    "bert",
    "roberta",
    "distilbert",
    "albert",
    "electra",
    "modernbert",
    "gpt2",
    "gptj",
    "opt",
    "llama-gqa",
    "mistral-window",
    "qwen2-window",
    "gemma",
    "phi",
    "bart",
    "mbart",
    "whisper",
    "vit",
    "clip",
]
"""Families whose logits are ``scale · q·kᵀ`` (RoPE included). Not here: additive position biases that
the projections do not scale (T5, DeBERTa, MPT's and Falcon's ALiBi), and fused layouts that need a
mapping (Bloom, GPT-NeoX: see below)."""
GROUPED = {"llama-gqa", "mistral-window", "qwen2-window", "gemma"}


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_hugging_face_families(name):
    pytest.importorskip("transformers")
    from tests.helpers import hf_families as hf

    family = hf.FAMILIES[name]
    model = family.build("eager" if "sdpa" in family.unsupported else "sdpa")
    inputs = hf.family_inputs(family)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False  # replayed calls must not find the first forward's keys in a cache
    tau, before, after, params = clip_once(model, inputs)
    assert_clipped(tau, before, after, exact_others=name not in GROUPED)
    assert_only_qk_changed(model, params)


def test_user_mapping_of_an_interleaved_fused_projection():
    """GPT-NeoX's ``query_key_value`` is ``[H, 3, d]`` per head: only a user mapping can name its rows."""
    pytest.importorskip("transformers")
    from tests.helpers import hf_families as hf

    family = hf.FAMILIES["gpt-neox"]
    model = family.build("sdpa")
    with pytest.raises(ValueError, match=r"attention module 'layers.0.attention' \(GPTNeoXAttention\).*qk_clip.projections"):
        QKClip(QKClipConfig(tau=1.0), model, resolve_targets(model))
    heads, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    offsets = torch.arange(heads)[:, None] * 3 * d + torch.arange(d)  # [H, d] rows of each head's queries
    mapping = {f"layers.{i}.attention.query_key_value": (offsets.flatten(), (offsets + d).flatten()) for i in range(2)}
    tau, before, after, params = clip_once(model, {**hf.family_inputs(family), "use_cache": False}, projections=mapping)
    assert_clipped(tau, before, after)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, params[n])]
    assert changed and all("query_key_value" in n for n in changed)
    weight = model.get_parameter("layers.0.attention.query_key_value.weight")
    values = (offsets + 2 * d).flatten()
    assert torch.equal(weight[values], params["layers.0.attention.query_key_value.weight"][values])


def test_unrecognised_and_normalised_projections_are_errors_at_setup():
    pytest.importorskip("transformers")
    from tests.helpers import hf_families as hf

    bloom = hf.FAMILIES["bloom"].build("eager")
    with pytest.raises(ValueError, match=r"'h.0.self_attention' \(BloomAttention\)"):
        QKClip(QKClipConfig(tau=1.0), bloom, resolve_targets(bloom))
    # leaving the modules out is accepted
    QKClip(QKClipConfig(tau=1.0, layers=["nothing"]), bloom, resolve_targets(bloom))

    class QKNormAttention(SdpaAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.q_norm, self.k_norm = nn.LayerNorm(4), nn.LayerNorm(4)

    model = TinyTransformer(QKNormAttention)
    with pytest.raises(ValueError, match=r"'layers.0' \(QKNormAttention\) normalises queries and keys"):
        QKClip(QKClipConfig(tau=1.0), model, resolve_targets(model))

    class DisabledQKNormAttention(SdpaAttention):  # qk-layernorm switched off by a config flag
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()

    model = TinyTransformer(DisabledQKNormAttention)
    assert set(QKClip(QKClipConfig(tau=1.0), model, resolve_targets(model))._modules) == {"layers.0", "layers.1"}


def test_layers_matching_no_attention_module_are_an_error_at_setup():
    from attnmonitor.integrations.loop import AttentionMonitorLoop

    with pytest.raises(ValueError, match=r"`qk_clip.layers`=\['nomatch'\] matches none of the attention layers"):
        AttentionMonitorLoop(TinyTransformer(), qk_clip={"tau": 10.0, "layers": ["nomatch"]})


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"`qk_clip.tau` must be"):
        QKClipConfig(tau=0)
    with pytest.raises(ValueError, match=r"`qk_clip.projections\['a.qkv'\]` must be \[query rows, key rows\]"):
        QKClipConfig(projections={"a.qkv": [0, 16]})
    with pytest.raises(ValueError, match=r"`qk_clip` reads the statistic 'max_logit'"):
        MonitorOptions(qk_clip={"tau": 10}, capture={"statistics": ["entropy"]})
    with pytest.raises(ValueError, match=r"key rows selects rows outside \[0, 48\)"):
        model = TinyTransformer(SdpaAttention)
        model.layers[0].qkv = nn.Linear(16, 48)
        QKClip(QKClipConfig(tau=1.0, projections={"layers.0.qkv": ([0, 16], [40, 56])}), model, resolve_targets(model))
    with pytest.raises(ValueError, match=r"`qk_clip.projections` names 'layers.9.qkv', which is no module inside"):
        QKClip(QKClipConfig(tau=1.0, projections={"layers.9.qkv": ([0, 16], [16, 32])}), model, resolve_targets(model))


# ------------------------------------------------------------------------------------------------
# in training


@ignore_few_batches
@ignore_no_validation_data
def test_lightning_clips_after_the_optimizer_step(tmp_path):
    """A frozen optimizer (learning rate 0) isolates the clip: the same batch afterwards peaks at tau."""
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=50, seq_len=16, dim=32, layers=2, heads=4, lr=0.0)
    ids = torch.randint(50, (8, 16))
    before = max_logits(model, dict(input_ids=ids))
    replay = recorded_inputs(model, dict(input_ids=ids), list(before))
    tau = float(torch.cat(list(before.values())).median())
    monitor = AttentionMonitor(qk_clip={"tau": tau}, schedule={"every_n_steps": 2}, dashboards={"heatmaps": None, "analyses": False})
    data = DataLoader(TensorDataset(ids, torch.randint(50, (8, 16))), batch_size=8)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(model, data)
    assert_clipped(tau, before, max_logits(model, dict(input_ids=ids), replay))
    logged = read_events(tmp_path / "tb" / "version_0").Scalars("attn_reg/qk_clipped_heads")
    assert [(e.step, e.value) for e in logged] == [(0, sum(int((v > tau).sum()) for v in before.values()))]


def _train_max_logit(tmp_path, qk_clip) -> list[float]:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=50, seq_len=16, dim=32, layers=2, heads=4, lr=0.03)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(50, (64, 17), generator=g)
    data = DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=8)
    monitor = AttentionMonitor(qk_clip=qk_clip, schedule={"every_n_steps": 5}, dashboards={"heatmaps": None, "analyses": False})
    make_trainer(tmp_path, [monitor], max_steps=60).fit(model, data)
    return [e.value for e in read_events(tmp_path / "tb" / "version_0").Scalars("attn_train/max_logit")]


@pytest.mark.slow
@ignore_no_validation_data
def test_clipping_holds_logits_down_while_training(tmp_path):
    """At a learning rate where the logits grow sixfold in 60 steps, QK-clip keeps every capture near tau (the step's
    own growth is clipped after it)."""
    free = _train_max_logit(tmp_path / "free", None)
    clipped = _train_max_logit(tmp_path / "clipped", {"tau": 5.0})
    assert max(free) > 4 * 5.0, free
    assert max(clipped) < 2 * 5.0 and all(math.isfinite(v) for v in clipped), clipped


@pytest.mark.slow
def test_ddp_ranks_clip_and_alarm_alike(tmp_path):
    """Two processes with different data: the same heads clipped by the same factors (identical weights
    at the end) and the same alarms acted on at the same steps."""
    job = Path(__file__).parent / "helpers" / "health_ddp_job.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run([sys.executable, str(job), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    firings = [json.loads((tmp_path / f"firings_rank{r}.json").read_text()) for r in (0, 1)]
    assert firings[0] and firings[0] == firings[1]
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    clipped = read_events(tmp_path / "tb" / "version_0").Scalars("attn_reg/qk_clipped_heads")
    assert len(clipped) == 8 and sum(e.value for e in clipped) > 0
