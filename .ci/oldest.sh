#!/usr/bin/env bash
# The oldest supported dependencies: installs every dependency of pyproject.toml (and its `dev` extra) at the
# lower bound of its range, then runs the suite without the slow tests.
#
# NOT run by CI (.ci/run installs the newest releases the ranges allow). Run it by hand before raising a lower
# bound, or to check that one still holds:
#
#     bash .ci/oldest.sh                         # the whole suite but the slow tests
#     bash .ci/oldest.sh tests/test_callback.py  # extra arguments go to pytest
#
# The pins are read from pyproject.toml (`name>=X` becomes `name==X`), so they follow its ranges. torch is the
# exception: the CPU build 2.13.0 is installed first (its lower bound, 2.6, is not installed here). The
# virtual environment is made in a temporary directory and removed at the end; set OLDEST_VENV=DIR to make it
# there and keep it (a second run with the same DIR skips the installs). OLDEST_PYTHON picks the interpreter
# (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

python=${OLDEST_PYTHON:-python3}
if [[ -n ${OLDEST_VENV:-} ]]; then
    venv=$OLDEST_VENV
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    venv=$tmp/venv
fi

# `name>=X` -> `name==X` for every requirement but torch and the exact pins (ruff)
pins=$("$python" - <<'EOF'
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
pins = {}
for requirement in requirements:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    lower = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if name == "torch" or "==" in requirement:
        continue
    if lower is None:
        sys.exit(f"oldest.sh: {requirement!r} has no lower bound")
    pins[name] = f"{name}=={lower.group(1)}"
print(" ".join(pins.values()))
EOF
)
echo "oldest.sh: torch==2.13.0 $pins"

if [[ ! -f $venv/.oldest-installed ]]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0
    # shellcheck disable=SC2086  # one argument per pin
    "$venv/bin/python" -m pip install -q -e ".[dev]" $pins
    touch "$venv/.oldest-installed"
fi
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|lightning|torchmetrics|tensorboard|hydra-core|omegaconf|matplotlib|numpy|transformers|accelerate|pytest) "
"$venv/bin/python" -m pytest -m "not slow" -q "$@"
