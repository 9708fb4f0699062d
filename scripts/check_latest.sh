#!/usr/bin/env bash
# Scheduled check, not part of CI: this checkout against the newest releases of its dependencies.
#
# Makes a fresh virtualenv, installs mlxpost from this checkout without its dependencies
# (--no-deps, so pyproject's upper bounds do not apply), then the newest release of each
# dependency of mlxpost[mlx,torch,test] with the version ranges stripped, runs the test suite
# and prints what was installed and what failed. The bounds protect users from known removals;
# this run shows what the next releases break before a user meets it.
#
#   scripts/check_latest.sh [VENV]    # default: ${TMPDIR:-/tmp}/mlxpost-venv-latest
#   PYTHON=python3.12 scripts/check_latest.sh
#
# torch: on Linux without an NVIDIA GPU any torch requirement but the pinned CPU wheel pulls
# the newest CUDA build (several GB), so there torch stays at constraints/linux-cpu.txt's pin.
# On macOS, or where nvidia-smi finds a GPU, torch is upgraded like everything else.
# Needs Python 3.11+ (tomllib) and PyPI; about 15 minutes on a 2-core CPU (install and suite).
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-${TMPDIR:-/tmp}/mlxpost-venv-latest}
PYTHON=${PYTHON:-python3}
LOG="$VENV/pytest.log"
PIP_LOG="$VENV.pip.log"

if [[ $(uname) == Linux ]] && ! nvidia-smi >/dev/null 2>&1; then
    TORCH=$(grep '^torch==' constraints/linux-cpu.txt)
    TORCH_NOTE="pinned ($TORCH from constraints/linux-cpu.txt: CPU-only Linux)"
else
    TORCH=torch
    TORCH_NOTE="newest"
fi

pip_install() {  # quiet unless it fails
    "$PY" -m pip install "$@" >>"$PIP_LOG" 2>&1 || { tail -n 30 "$PIP_LOG"; exit 1; }
}

rm -rf "$VENV" "$PIP_LOG"
"$PYTHON" -m venv "$VENV" || exit 1
PY="$VENV/bin/python"
pip_install --upgrade pip
pip_install --no-deps -e .

# Every requirement of mlxpost[mlx,test] without its version range, markers kept
# (pip skips the ones for other platforms); torch is added separately above.
mapfile -t REQUIREMENTS < <(
    "$PY" - <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["mlx"] + extras["test"]:
    spec, _, marker = requirement.partition(";")
    name = re.match(r"\s*[A-Za-z0-9._-]+(\[[^\]]*\])?", spec).group(0).strip()
    print(f"{name}; {marker.strip()}" if marker.strip() else name)
EOF
)
echo "installing the newest releases of: ${REQUIREMENTS[*]} (torch: $TORCH_NOTE)"
# The constraint keeps a dependency's own requirement from pulling another torch.
pip_install --upgrade --upgrade-strategy eager -c <(echo "$TORCH") "$TORCH" "${REQUIREMENTS[@]}"

echo "running the test suite (log: $LOG)"
"$PY" -m pytest -q -p no:cacheprovider -rfE --tb=line >"$LOG" 2>&1
STATUS=$?

echo
echo "== installed (newest releases; torch $TORCH_NOTE) =="
"$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version

pins = dict(
    line.strip().split("==")
    for line in open("constraints/linux-cpu.txt")
    if "==" in line and not line.startswith("#")
)
for name in ("transformers", "tokenizers", "torch", "mlx", "mlx-lm", "numpy", "datasets",
             "safetensors", "peft"):
    try:
        found = version(name)
    except PackageNotFoundError:
        found = "not installed"
    pinned = pins.get(name, "-")
    print(f"  {name:<13} {found:<14} (pinned in constraints/linux-cpu.txt: {pinned})")
EOF
echo
echo "== tests (exit status $STATUS) =="
tail -n 1 "$LOG"
grep -E '^(FAILED|ERROR) ' "$LOG" | cut -c 1-300
echo
echo "== warnings that announce a removal =="
grep -hoE "[A-Za-z]*Warning: .*(deprecated|removed in).*" "$LOG" | sort -u | cut -c 1-300 | head -n 20
exit "$STATUS"
