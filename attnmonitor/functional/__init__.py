"""Pure tensor functions: attention statistics, masks and chunked evaluation. No state, no logging."""

from attnmonitor.functional.chunked import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_head_sums,
    chunked_head_sums,
    key_valid_from_logits,
    probability_chunks,
    qk_chunks,
    qk_logit_max,
    sdpa_key_valid,
)
from attnmonitor.functional.evaluation import AttentionCall, CallSums, call_head_sums
from attnmonitor.functional.fused import fused_path_refusal, fused_row_statistics
from attnmonitor.functional.masks import diagonal_valid, first_valid_keys, sequence_starts, sink_keys
from attnmonitor.functional.regularization import clip_attention, entropy_penalty, sparsity_penalty
from attnmonitor.functional.statistics import (
    MAX_STATISTICS,
    OFFSET_WEIGHTS,
    POSITION_STATISTICS,
    ROW_STATISTICS,
    STATISTICS,
    attention_statistics,
    check_statistics,
    head_max,
    head_sums,
    logit_row_max,
    mean_from_sums,
    row_statistics,
    safe_entropy,
)

__all__ = [
    "AttentionCall",
    "CallSums",
    "call_head_sums",
    "clip_attention",
    "entropy_penalty",
    "fused_path_refusal",
    "fused_row_statistics",
    "safe_entropy",
    "sparsity_penalty",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "MAX_STATISTICS",
    "OFFSET_WEIGHTS",
    "POSITION_STATISTICS",
    "ROW_STATISTICS",
    "STATISTICS",
    "attention_statistics",
    "check_statistics",
    "chunk_head_sums",
    "chunked_head_sums",
    "diagonal_valid",
    "first_valid_keys",
    "head_max",
    "head_sums",
    "key_valid_from_logits",
    "logit_row_max",
    "mean_from_sums",
    "probability_chunks",
    "qk_chunks",
    "qk_logit_max",
    "row_statistics",
    "sdpa_key_valid",
    "sequence_starts",
    "sink_keys",
]
