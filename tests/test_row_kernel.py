"""The compiled one-pass statistics kernel gives what the float64 per-row reference gives, on causal,
padded and packed masks, and is used only where it should be."""

from __future__ import annotations

import math

import pytest
import torch

import attnmonitor.functional.row_kernel as row_kernel
from attnmonitor.functional import ROW_STATISTICS, attention_statistics
from tests.helpers.reference import assert_stats_close, head_means

B, H, L = 2, 3, 24


def _probs(key_valid: torch.Tensor) -> torch.Tensor:
    logits = torch.randn(B, H, L, L, generator=torch.Generator().manual_seed(0)) * 3
    return logits.masked_fill(~key_valid, -math.inf).softmax(-1).nan_to_num(0.0)


def _masks() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    lengths = torch.tensor([L, 15])
    keys = torch.arange(L) < lengths.view(B, 1, 1, 1)
    padded = causal & keys
    documents = (torch.arange(L) >= 10).long()  # two packed documents: keys of the same one only
    packed = causal & (documents.view(-1, 1) == documents.view(1, -1))
    rows = (torch.arange(L) < lengths.view(B, 1, 1)).expand(B, H, L)
    everything = torch.ones(L, L, dtype=torch.bool)
    return {"causal": (causal, None), "padded": (padded, rows), "packed": (packed, None), "bidirectional": (everything, None)}


@pytest.mark.parametrize("layout", list(_masks()))
def test_the_fused_kernel_equals_the_float64_reference(layout, monkeypatch):
    monkeypatch.setattr(row_kernel, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(row_kernel, "_failed", False)
    used = []
    real = row_kernel.fused_reductions
    monkeypatch.setattr(row_kernel, "fused_reductions", lambda *a: used.append(1) or real(*a))
    key_valid, query_valid = _masks()[layout]
    probs = _probs(key_valid)
    actual = attention_statistics(probs, key_valid, query_valid, statistics=ROW_STATISTICS)
    assert used and row_kernel._failed is False  # the compiled kernel computed them
    expected = head_means(probs, key_valid, query_valid)
    assert_stats_close(actual, {name: expected[name] for name in ROW_STATISTICS}, rtol=1e-5, atol=1e-5)


def test_small_tensors_and_gradients_stay_on_the_eager_path(monkeypatch):
    calls = []
    monkeypatch.setattr(row_kernel._row_reductions, "compiled", lambda *a: calls.append(a))
    monkeypatch.setattr(row_kernel, "_failed", False)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    attention_statistics(_probs(causal), causal)  # B·H·L·L far below MIN_ELEMENTS
    probs = _probs(causal).requires_grad_()
    monkeypatch.setattr(row_kernel, "MIN_ELEMENTS", 0)
    attention_statistics(probs, causal)["entropy"].sum().backward()  # a regularizer's gradient: eager
    assert calls == [] and probs.grad is not None


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(row_kernel, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(row_kernel, "_failed", False)
    monkeypatch.setattr(row_kernel._row_reductions, "compiled", broken)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    with pytest.warns(RuntimeWarning, match="fused statistics kernel is off .*no C\\+\\+ compiler"):
        fallback = attention_statistics(_probs(causal), causal)
    assert row_kernel._failed
    monkeypatch.setattr(row_kernel, "_failed", True)
    assert_stats_close(fallback, attention_statistics(_probs(causal), causal))


def test_a_kernel_stays_compiled_on_the_eager_steps_of_a_compiled_model():
    """A captured step of a compiled model runs under the ``force_eager`` stance; the statistics kernels
    must not fall back to their Python code there (it was 2–3 times slower)."""
    traced = []

    def doubled(x: torch.Tensor) -> torch.Tensor:
        traced.append(torch.compiler.is_compiling())  # False where the Python code runs eagerly
        return x * 2

    kernel = row_kernel.CompiledKernel(doubled)
    x = torch.ones(3)
    with torch.compiler.set_stance("force_eager"):
        torch.testing.assert_close(kernel(x), x * 2)
        torch.testing.assert_close(kernel(x), x * 2)
    assert traced and all(traced)
