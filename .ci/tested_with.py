"""Print the README's "Tested with:" line from the installed versions, or check the README's one.

``python .ci/tested_with.py`` prints ``Tested with: Python 3.11, torch 2.13.0, ...``;
``python .ci/tested_with.py --check README.md`` exits 1 unless README.md has a line starting with
``Tested with:`` that names the same packages. Their versions may differ (CI may install newer patch
releases): it then prints a note and exits 0.
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "lightning", "torchmetrics", "transformers", "hydra-core", "tensorboard")
PREFIX = "Tested with:"


def installed() -> dict[str, str]:
    """``{name: version}``: Python (major.minor) and each of :data:`PACKAGES` (without a local part: 2.13.0+cpu -> 2.13.0)."""
    versions = {"Python": ".".join(platform.python_version_tuple()[:2])}
    for name in PACKAGES:
        try:
            versions[name] = version(name).split("+")[0]
        except PackageNotFoundError:
            versions[name] = "(not installed)"
    return versions


def line(versions: dict[str, str]) -> str:
    """The Markdown line."""
    return f"{PREFIX} " + ", ".join(f"{name} {v}" for name, v in versions.items())


def parse(text: str) -> dict[str, str] | None:
    """``{name: version}`` of the first line of ``text`` that starts with :data:`PREFIX`, or None."""
    for raw in text.splitlines():
        if raw.startswith(PREFIX):
            items = (item.strip().rstrip(".").strip() for item in raw[len(PREFIX) :].split(","))
            return {name: v.strip() for name, _, v in (item.partition(" ") for item in items if item)}
    return None


def check(path: Path, versions: dict[str, str]) -> int:
    """0 if ``path`` has a "Tested with:" line naming the packages of ``versions``; notes version differences."""
    documented = parse(path.read_text(encoding="utf-8"))
    if documented is None:
        print(f"{path}: no line starting with {PREFIX!r}; add:\n{line(versions)}")
        return 1
    if set(documented) != set(versions):
        missing, extra = sorted(set(versions) - set(documented)), sorted(set(documented) - set(versions))
        print(f"{path}: the {PREFIX!r} line names other packages (missing: {missing}, unexpected: {extra}); expected:\n{line(versions)}")
        return 1
    differ = [f"{name} {documented[name]} -> {v}" for name, v in versions.items() if documented[name] != v]
    if differ:
        print(f"note: {path} documents other versions than the installed ones: " + ", ".join(differ))
    else:
        print(f"{path}: {PREFIX!r} line matches the installed versions")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the line, or with ``--check`` return the check's exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="README", type=Path, help="check this file's line instead of printing one")
    args = parser.parse_args(argv)
    versions = installed()
    if args.check is None:
        print(line(versions))
        return 0
    return check(args.check, versions)


if __name__ == "__main__":
    sys.exit(main())
