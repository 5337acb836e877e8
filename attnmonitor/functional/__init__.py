"""Pure tensor functions: attention statistics, masks and chunked evaluation. No state, no logging."""

from attnmonitor.functional.chunked import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    chunked_head_sums,
    key_valid_from_logits,
    probability_chunks,
    qk_chunks,
    sdpa_key_valid,
)
from attnmonitor.functional.masks import diagonal_valid, first_valid_keys, sequence_starts, sink_keys
from attnmonitor.functional.statistics import (
    POSITION_STATISTICS,
    STATISTICS,
    attention_statistics,
    check_statistics,
    head_sums,
    mean_from_sums,
    row_statistics,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "POSITION_STATISTICS",
    "STATISTICS",
    "attention_statistics",
    "check_statistics",
    "chunked_head_sums",
    "diagonal_valid",
    "first_valid_keys",
    "head_sums",
    "key_valid_from_logits",
    "mean_from_sums",
    "probability_chunks",
    "qk_chunks",
    "row_statistics",
    "sdpa_key_valid",
    "sequence_starts",
    "sink_keys",
]
