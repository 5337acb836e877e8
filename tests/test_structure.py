"""The structure stays as documented: the code layout lists every module, the README's set-up commands
are the ones CI runs, and the package's import graph has no cycle."""

import ast
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


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_import_graph_has_no_cycle():
    modules = {_module(p): p for p in (ROOT / "attnmonitor").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module-level imports (deferred imports inside functions are not edges)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnmonitor"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path[path.index(name) :], name])}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert graph["attnmonitor.checks"] == set()  # the ground floor imports nothing of ours


def test_the_docs_state_the_defaults_the_code_has():
    import yaml

    from attnmonitor import STATISTICS

    readme, reference = (ROOT / "README.md").read_text(), (ROOT / "docs" / "reference.md").read_text()
    listed = re.search(r"The statistics \((.+?)\) are\s+defined", readme, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(STATISTICS)
    trainer = yaml.safe_load((ROOT / "attnmonitor" / "configs" / "trainer" / "default.yaml").read_text())
    monitor = yaml.safe_load((ROOT / "attnmonitor" / "configs" / "callbacks" / "attention_monitor.yaml").read_text())["attention_monitor"]
    screenshots = re.search(r"after the main job \(`attnmonitor-train`, (\d+) steps, captures every (\d+),", reference)
    assert (int(screenshots.group(1)), int(screenshots.group(2))) == (trainer["max_steps"], monitor["schedule"]["every_n_steps"])
    assert "`alarms=None`" in readme and monitor["alarms"] is not None  # off in Python, on in the main job, said in the README
