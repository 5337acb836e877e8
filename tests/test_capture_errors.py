"""Bad input to AttentionCapture: clear errors, warnings naming the layer, never stale results."""

import copy
import re

import pytest
import torch
from torch import nn

from attnmonitor import AttentionCapture
from tests.helpers.models import SdpaAttention, TinyTransformer


class ExpNormAttention(SdpaAttention):
    """Normalises with exp/sum instead of softmax or SDPA: nothing the capture can intercept."""

    def forward(self, x, attn_mask=None):
        q, k = self.qk(x)
        s = q @ k.transpose(-2, -1)
        w = (s - s.amax(-1, keepdim=True)).exp()
        w = w / w.sum(-1, keepdim=True)
        return self.o((w @ q).transpose(1, 2).reshape(x.shape))


def test_targets_matching_nothing_list_the_attention_modules():
    with pytest.raises(ValueError, match=r"selects no module.*\['layers.0', 'layers.1'\]"):
        AttentionCapture(TinyTransformer(), targets=r"blocks\.\d+")


def test_model_without_attention_is_rejected():
    with pytest.raises(ValueError, match="Sequential has no attention module"):
        AttentionCapture(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets="layers.(0"), "invalid regular expression"),
        (dict(targets=3), "`targets` must be"),
        (dict(statistics=["entropy", "perplexity"]), r"`statistics`.*'perplexity'"),
        (dict(memory_budget_mb=0), "`memory_budget_mb` must be > 0, got 0"),
        (dict(sink_tokens=0), "`sink_tokens` must be an int >= 1, got 0"),
        (dict(sparsity_eps=2.0), r"`sparsity_eps` must be in \(0, 1\], got 2.0"),
    ],
)
def test_invalid_arguments_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionCapture(TinyTransformer(), **kwargs)


def test_predicate_and_regex_targets():
    model = TinyTransformer(n_layers=3)
    assert list(AttentionCapture(model, targets=lambda name, m: name.endswith("2")).targets) == ["layers.2"]
    assert list(AttentionCapture(model, targets=[r"layers\.[01]"]).targets) == ["layers.0", "layers.1"]


def test_nan_attention_warns_with_the_layer_and_is_skipped():
    model = TinyTransformer(n_layers=2).eval()
    with torch.no_grad():
        model.layers[1].q.weight[0, 0] = float("nan")
    with AttentionCapture(model) as cap, pytest.warns(RuntimeWarning, match=r"skipped a capture of layer 'layers.1'.*NaN"):
        model(torch.randint(50, (2, 5)))
    assert cap.skipped == {"layers.1": 1}
    assert cap.layers == ["layers.0"]
    assert torch.isfinite(cap.stats()["entropy"]).all()


def test_module_that_yields_no_attention_is_reported_and_stats_refuse():
    model = TinyTransformer(ExpNormAttention)
    with AttentionCapture(model) as cap:
        silent = r"'(layers\.\d)' \(ExpNormAttention\) ran but no attention"
        with pytest.warns(RuntimeWarning, match=silent) as record:
            model(torch.randint(50, (1, 4)))
        warned = [re.search(silent, str(w.message)) for w in record]
        assert [m[1] for m in warned if m] == ["layers.0", "layers.1"]  # each silent layer, once
        with pytest.raises(RuntimeError, match=r"no attention captured.*ran without yielding attention: \['layers.0', 'layers.1'\]"):
            cap.stats()


def test_stats_before_any_forward_raise():
    with AttentionCapture(TinyTransformer()) as cap, pytest.raises(RuntimeError, match="no target module ran"):
        cap.stats()


def test_query_mask_of_the_wrong_shape_warns():
    model = TinyTransformer()
    with AttentionCapture(model, query_mask=torch.ones(2, 9)) as cap:
        misfit = r"query mask \(2, 9\) does not match the queries \[B=2, Lq=5\] of layer '(layers\.\d)'"
        with pytest.warns(RuntimeWarning, match=misfit) as record:
            model(torch.randint(50, (2, 5)))
    warned = [re.search(misfit, str(w.message)) for w in record]
    assert [m[1] for m in warned if m] == ["layers.0", "layers.1"]  # each layer it does not fit, once
    assert cap.layers == ["layers.0", "layers.1"]


def test_a_deep_copy_of_a_watched_model_runs_unwatched():
    model = TinyTransformer()
    with AttentionCapture(model) as cap, torch.no_grad():
        twin = copy.deepcopy(model)  # e.g. an EMA copy made while the monitor is attached: the hooks come along
        twin(torch.randint(50, (2, 5)))
        model(torch.randint(50, (2, 5)))
    assert cap.layers == ["layers.0", "layers.1"]
    assert cap.valid_rows()["layers.0"].tolist() == [10.0] * 4  # the copy's forward added nothing
