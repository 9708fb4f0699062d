#!/usr/bin/env bash
# Create .venv and install mlxpost with both backends and the test tools.
# On Linux without an NVIDIA driver, torch is pinned to its CPU wheel
# (constraints/linux-cpu.txt); any other torch requirement would pull the
# CUDA build. macOS and CUDA machines get the ordinary requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
constraints=()
if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints=(-c constraints/linux-cpu.txt)
fi
.venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".[all]"
.venv/bin/mlxpost --version
