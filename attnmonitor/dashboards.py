"""What a publication shows besides the statistic scalars: the example of each stage (token ids kept
from its batch), its analyses, and the figures, drawn off the training thread."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from attnmonitor.analysis import ExampleAnalysis, analyse_example, role_changes
from attnmonitor.batch import example_ids, example_row, token_strings
from attnmonitor.capture.accumulator import Example
from attnmonitor.capture.calls import CROSS
from attnmonitor.checks import layer_selected
from attnmonitor.config import MonitorOptions
from attnmonitor.metrics.state import Synced
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.worker import FigureWorker
from attnmonitor.tensorboard.writer import example_scalars, write_atlases, write_example, write_heatmap


@dataclass
class ExampleTokens:
    """Token ids of a stage's example: one element of the first captured batch (:func:`example_row`)."""

    ids: Tensor | None = None  # [L]
    query_ids: Tensor | None = None  # [L] the decoder's ids, for cross-attention labels

    def labels(self, tokenizer: Any, start: int = 0, length: int | None = None, queries: bool = False) -> list[str] | None:
        """Token strings of the kept ids (``queries``: the decoder's) from ``start``, or None."""
        ids = self.query_ids if queries else self.ids
        if ids is None:
            return None
        return token_strings(ids[start:] if length is None else ids[start : start + length], tokenizer)


Analysis = tuple[dict[str, float], ExampleAnalysis, list[str]]
"""``(scalars, result, role changes)`` of a stage's example."""


class Dashboards:
    """The examples, analyses and figures of every stage.

    Args:
        options: the monitor's options (tokenizer, batch keys, heatmaps, analyses).
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        self.tokens: dict[str, ExampleTokens] = {}
        self.figures = FigureWorker()
        """Draws and writes figures off the training thread."""
        self._roles: dict[str, Tensor] = {}  # {stage: [L, H] head roles} of the last analysis

    def keep_example(self, stage: str, batch: Any) -> int:
        """Choose the batch's example (:func:`example_row`), keep its token ids (the labels); returns its row."""
        keys = self.options.batch
        row = example_row(batch, keys.input_key)
        queries = example_ids(batch, keys.decoder_input_key, positional=False, row=row)
        self.tokens[stage] = ExampleTokens(example_ids(batch, keys.input_key, row=row), queries)
        return row

    def analyse(self, stage: str, synced: Synced, examples: Mapping[str, Example], kinds: Mapping[str, str]) -> Analysis | None:
        """Analyses of the stage's example and their scalars, or None without an example."""
        options, tokens = self.options.dashboards, self.tokens.get(stage, ExampleTokens())
        classes = None if options.token_classes is None else {k: frozenset(v) for k, v in options.token_classes.items()}
        result = analyse_example(
            synced.layers,
            examples,
            tokens.labels(options.tokenizer),
            sink_tokens=self.options.capture.sink_tokens,
            top_k=options.top_k,
            classes=classes,
            kinds=kinds,
            query_tokens=tokens.labels(options.tokenizer, queries=True),
            token_shares=options.tokenizer is not None or classes is not None,
        )
        if result.roles is None:
            return None
        changes = role_changes(self._roles.get(stage), result.roles, result.layers)
        scalars = example_scalars(stage, result)
        scalars[tags.role_changes(stage)] = float(len(changes)) if stage in self._roles else 0.0
        self._roles[stage] = result.roles
        return scalars, result, changes

    def submit(
        self,
        writer: Any,
        stage: str,
        step: int,
        synced: Synced,
        *,
        atlases: bool,
        heatmaps: bool,
        examples: Mapping[str, Example],
        kinds: Mapping[str, str],
        analysis: Analysis | None,
    ) -> None:
        """Copy what the figures need to the CPU now, and draw and write them in the background."""
        layers, observed = list(synced.layers), synced.observed.cpu()
        values = {name: value.detach().cpu() for name, value in synced.values.items()}
        maps = self._heatmap_inputs(stage, examples, kinds) if heatmaps else []

        def job() -> None:
            if atlases:
                write_atlases(writer, stage, step, layers, values, observed)
            for layer, probs, keys, queries, cross in maps:
                write_heatmap(writer, stage, step, layer, probs, keys, queries, cross=cross)
            if analysis is not None:
                write_example(writer, stage, step, analysis[1], analysis[2])
            writer.flush()

        self.figures.submit(job, f"{stage} step {step}")

    def close(self) -> None:
        """Wait until every figure is drawn and written."""
        self.figures.close()

    def _heatmap_inputs(
        self, stage: str, examples: Mapping[str, Example], kinds: Mapping[str, str]
    ) -> list[tuple[str, Tensor, list[str] | None, list[str] | None, bool]]:
        """``(layer, probs, key labels, query labels, cross)`` of each example layer drawn."""
        tokens, tokenizer = self.tokens.get(stage, ExampleTokens()), self.options.dashboards.tokenizer
        heatmaps = self.options.dashboards.heatmaps
        patterns = heatmaps.layers if heatmaps is not None else None
        maps = []
        for layer, example in examples.items():
            if example.probs is None or not layer_selected(layer, patterns):
                continue
            cross = kinds.get(layer) == CROSS
            t_q, t_k = example.probs.shape[-2:]
            keys = tokens.labels(tokenizer, example.key_start, t_k)
            queries = tokens.labels(tokenizer, example.start, t_q, queries=cross)
            maps.append((layer, example.probs, keys, queries, cross))
        return maps
