"""The statistics on a GPU: parity with float64 references, and the cost of each path per call.

    python benchmarks/gpu.py [--device cuda] [--repeats 20]

Parity: a one-layer SDPA model records the ``q``/``k`` it passes to attention; the capture's per-head
statistics are compared with the naive float64 reference of ``tests/helpers/reference.py`` on those
same inputs, for each SDPA backend (flash, memory-efficient, math) × dtype (float32, bfloat16
autocast) × mask (causal; padded, which flash does not take) × statistics path (the compiled ``q·kᵀ``
kernel, the fused path's extra attention call, the chunked path); and a ``torch.compile``d
FlexAttention layer (causal block mask). Cost: per call, the statistics of each path against the
SDPA call itself, by shape and dtype. Combinations the device cannot run are printed as such.

Training throughput on the same machine: ``python benchmarks/throughput.py --shape attention|balanced|mlp``
(Lightning picks the GPU). ``--device cpu`` runs everything here on the CPU (to check the script).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the float64 reference of the tests

import attnmonitor.functional.row_kernel as row_kernel  # noqa: E402
from attnmonitor import STATISTICS, AttentionCapture  # noqa: E402
from attnmonitor.functional.evaluation import AttentionCall, call_head_sums  # noqa: E402
from attnmonitor.functional.fused import FUSED_STATISTICS  # noqa: E402
from tests.helpers.reference import attention_probs, head_max_logit, head_means  # noqa: E402

BATCH, HEADS, LENGTH, HEAD_DIM = 2, 4, 96, 32
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = 1e-4  # absolute, on statistics of order 1 (distance: of order L): every path evaluates in float32
FUSED_BF16_TOLERANCE = 2e-2  # the fused path's extra attention call runs in the inputs' dtype
COST_SHAPES = {
    "cuda": [(8, 16, 1024, 64), (2, 16, 4096, 64), (1, 32, 8192, 128)],
    "cpu": [(8, 8, 256, 8), (4, 8, 512, 64), (1, 32, 1024, 64), (1, 8, 2048, 64), (1, 4, 4096, 64)],
}


class SdpaLayer(nn.Module):
    """Self-attention through SDPA that keeps the ``q``/``k`` it passed (the reference's inputs)."""

    def __init__(self, attention=F.scaled_dot_product_attention) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.qkv = nn.Linear(HEADS * HEAD_DIM, 3 * HEADS * HEAD_DIM)
        self.attention = attention
        self.seen: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, mask: Tensor | None = None, block_mask=None) -> Tensor:  # type: ignore[no-untyped-def]
        b, length, width = x.shape
        q, k, v = (t.view(b, length, HEADS, HEAD_DIM).transpose(1, 2) for t in self.qkv(x).split(width, -1))
        self.seen = (q.detach(), k.detach())
        if block_mask is not None:
            out = self.attention(q, k, v, block_mask=block_mask)
        else:
            out = self.attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return out.transpose(1, 2).reshape(b, length, width)


def reference(q: Tensor, k: Tensor, key_valid: Tensor, query_valid: Tensor | None) -> dict[str, Tensor]:
    """Float64 per-head statistics of the call, from the naive reference."""
    q, k = q.double().cpu(), k.double().cpu()
    expected = head_means(attention_probs(q, k, key_valid), key_valid, query_valid)
    expected["max_logit"] = head_max_logit(q, k, key_valid, query_valid, None, None)
    return expected


def worst_error(captured: dict[str, Tensor], expected: dict[str, Tensor]) -> tuple[float, str]:
    errors = {name: (captured[name][0].double().cpu() - expected[name]).abs().max().item() for name in captured}
    name = max(errors, key=errors.get)  # type: ignore[arg-type]
    return errors[name], name


@contextlib.contextmanager
def statistics_path(path: str):  # type: ignore[no-untyped-def]
    """Route every call through one path: the compiled ``q·kᵀ`` kernel (at every size), or neither
    compiled kernel (the fused extra call where the statistics allow it, else chunks)."""
    saved = row_kernel.MIN_ELEMENTS, row_kernel._failed
    row_kernel.MIN_ELEMENTS, row_kernel._failed = (0, False) if path == "kernel" else (saved[0], True)
    try:
        yield
    finally:
        row_kernel.MIN_ELEMENTS, row_kernel._failed = saved


def masks(kind: str, device: str) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """``(SDPA mask, key_valid, query_valid)`` of a layout."""
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    if kind == "causal":
        return None, causal, None
    lengths = torch.tensor([LENGTH, 2 * LENGTH // 3])
    keys = torch.arange(LENGTH) < lengths.view(BATCH, 1, 1, 1)
    rows = (torch.arange(LENGTH) < lengths.view(BATCH, 1, 1)).expand(BATCH, HEADS, LENGTH)
    return (causal & keys).to(device), causal & keys, rows


def parity(device: str) -> bool:
    print(f"\nparity with the float64 reference ({BATCH}x{HEADS} heads, L = {LENGTH}, head dim {HEAD_DIM}); worst absolute error")
    print(f"{'attention':<10} {'dtype':<9} {'mask':<7} {'path':<8} {'error':>9}  statistic          result")
    ok = True
    torch.manual_seed(0)
    layer = SdpaLayer().to(device)
    x = torch.randn(BATCH, LENGTH, HEADS * HEAD_DIM, device=device)
    for backend, dtype, kind, path in (
        (b, d, m, p) for b in BACKENDS for d in DTYPES for m in ("causal", "padded") for p in ("kernel", "fused", "chunked")
    ):
        label = f"{backend:<10} {str(dtype).split('.')[1]:<9} {kind:<7} {path:<8}"
        sdpa_mask, key_valid, query_valid = masks(kind, device)
        wanted = [s for s in STATISTICS if s in FUSED_STATISTICS] if path == "fused" else list(STATISTICS)
        try:
            with statistics_path(path), AttentionCapture(layer, statistics=wanted) as capture, sdpa_kernel(BACKENDS[backend]):
                with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    layer(x, sdpa_mask)
                captured = capture.stats()
        except RuntimeError as err:
            print(f"{label} {'':>9}  {'':<18} not run here: {str(err).splitlines()[0][:70]}")
            continue
        assert layer.seen is not None
        error, name = worst_error(captured, reference(*layer.seen, key_valid, query_valid))
        passed = error <= (FUSED_BF16_TOLERANCE if path == "fused" and dtype == torch.bfloat16 else TOLERANCE)
        ok &= passed
        print(f"{label} {error:>9.2e}  {name:<18} {'PASS' if passed else 'FAIL'}", flush=True)
    return flex_parity(device) and ok


def flex_parity(device: str) -> bool:
    torch.manual_seed(0)
    layer = SdpaLayer(torch.compile(flex_attention)).to(device)
    x = torch.randn(BATCH, LENGTH, HEADS * HEAD_DIM, device=device)
    block_mask = create_block_mask(lambda b, h, q, k: k <= q, None, None, LENGTH, LENGTH, device=device)
    try:
        with AttentionCapture(layer) as capture, torch.no_grad():
            layer(x, block_mask=block_mask)
            captured = capture.stats()
    except Exception as err:  # noqa: BLE001 (a device without a flex kernel is reported, not fatal)
        print(f"flex (compiled), float32, causal: not run here: {str(err).splitlines()[0][:80]}")
        return True
    assert layer.seen is not None
    error, name = worst_error(captured, reference(*layer.seen, torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril(), None))
    print(f"{'flex, compiled':<18} float32   causal  {'':<8} {error:>9.2e}  {name:<18} {'PASS' if error <= TOLERANCE else 'FAIL'}")
    return error <= TOLERANCE


def seconds(fn, device: str, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``fn()`` (synchronised on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(device: str, repeats: int, shapes: list[tuple[int, int, int, int]]) -> None:
    print("\nper causal call: SDPA forward, and the statistics of each path in multiples of it")
    print(f"{'[B, H, L, D]':<22} {'dtype':<9} {'SDPA ms':>8} {'kernel ×':>9} {'fused ×':>8} {'chunked ×':>10}")
    for shape in shapes:
        for dtype in DTYPES:
            q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
            sdpa = seconds(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, repeats)
            call = AttentionCall(q=q, k=k, is_causal=True)
            ratios = []
            for path, wanted in (("kernel", STATISTICS), ("fused", FUSED_STATISTICS), ("chunked", STATISTICS)):
                with statistics_path(path):
                    run = lambda call=call, wanted=wanted: call_head_sums(call, statistics=wanted, sink_tokens=1, budget_bytes=256 << 20)  # noqa: E731
                    ratios.append(seconds(run, device, repeats) / sdpa)
            kernel, fused, chunked = ratios
            label = f"{str(list(shape)):<22} {str(dtype).split('.')[1]:<9}"
            print(f"{label} {sdpa * 1e3:>8.2f} {kernel:>9.2f} {fused:>8.2f} {chunked:>10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run it where a GPU is lent, or pass --device cpu to check the script")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}")
    ok = parity(args.device)
    cost(args.device, args.repeats, COST_SHAPES[args.device])
    print("\nparity: ALL PASS" if ok else "\nparity: SOME FAILED")


if __name__ == "__main__":
    main()
