"""Figure writers for loggers other than TensorBoard: each takes what the monitor gives a TensorBoard
``SummaryWriter`` (``add_image``, ``add_histogram``, ``add_text``) and logs it the logger's way.

- :class:`WandbWriter`: a Weights & Biases run (images, histograms, tables as HTML);
- :class:`MLflowWriter`: an MLflow run (images with their step, tables and histograms as artifacts);
- :class:`CSVWriter`: a folder (PNG, Markdown and CSV files; the plain loop's scalars too);
- :class:`Writers`: several of them (a ``SummaryWriter`` among them) as one.

The Lightning and Hugging Face adapters build them from the loggers and integrations they find; in
a plain loop pass one (or a list) to ``monitor.log(writer)``.
"""

from attnmonitor.loggers.csv_writer import CSVWriter
from attnmonitor.loggers.fanout import Writers, combine
from attnmonitor.loggers.mlflow_writer import MLflowWriter
from attnmonitor.loggers.wandb_writer import WandbWriter

__all__ = ["CSVWriter", "MLflowWriter", "WandbWriter", "Writers", "combine"]
