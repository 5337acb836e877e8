"""The documentation stays true to the tree: the code layout lists every module, the README's set-up
commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_code_layout_lists_every_module_once():
    text = (ROOT / "docs" / "internals.md").read_text()
    block = text.split("<!-- code-layout:start -->")[1].split("<!-- code-layout:end -->")[0]
    listed = re.findall(r"^- `(attnmonitor/[^`]+\.py)` — \S", block, flags=re.M)
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "attnmonitor").rglob("*.py"))
    assert sorted(listed) == modules, {"missing": sorted(set(modules) - set(listed)), "stale": sorted(set(listed) - set(modules))}
    assert len(listed) == len(set(listed))


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert commands[:2] == ["pip install torch==2.13.0 && pip install -e . && attnmonitor-train", _ci_test_command()]


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return lines[lines.index("# The README's test command:") + 1]
