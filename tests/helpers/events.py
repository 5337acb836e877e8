"""TensorBoard event files read back with every event kept."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import struct_pb2
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2


def read_events(path: str | Path) -> EventAccumulator:
    """The events under the run directory ``path``, loaded with no sampling of any kind."""
    events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def read_hparams(path: str | Path) -> dict[str, object]:
    """The last hyperparameters written under ``path`` (TensorBoard's HParams plugin data)."""
    found: dict[str, object] = {}
    for file in sorted(Path(path).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(file)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    found = {name: _plain(v) for name, v in data.session_start_info.hparams.items()}
    return found


def read_custom_scalar_layout(path: str | Path) -> layout_pb2.Layout | None:
    """The last custom-scalar layout written under ``path`` (the one TensorBoard shows), or None."""
    layout = None
    for file in sorted(Path(path).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(file)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
    return layout


def _plain(value: struct_pb2.Value) -> object:
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind else None
