"""A plain-PyTorch user pays for neither Lightning, matplotlib, TensorBoard nor transformers.

(``attnmonitor.metrics`` is not light: torchmetrics itself imports matplotlib and transformers when
they are installed.)
"""

import subprocess
import sys

import pytest

HEAVY = ("lightning", "matplotlib", "tensorboard", "transformers", "hydra")


@pytest.mark.parametrize(
    "statement",
    [
        "from attnmonitor import AttentionCapture",
        "import attnmonitor.functional",
        "from attnmonitor.regularization import AttentionRegularizer",
    ],
)
def test_light_entry_points_import_no_heavy_package(statement):
    probe = f"import sys; {statement}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", (statement, result.stdout)


def test_the_callback_is_still_a_top_level_name():
    probe = "import sys, attnmonitor; assert 'lightning' not in sys.modules; print(attnmonitor.AttentionMonitor.__name__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "AttentionMonitor"
