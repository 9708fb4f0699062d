"""The torch backend's CPU malloc settings (torch_backend/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = (
    "from torch_backend import allocator; import torch_backend.backend as b; "
    "b.TorchBackend('cpu'); print(allocator._done)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("setting, expected", [(None, "True"), ("system", "False")])
def test_a_cpu_backend_keeps_freed_memory_unless_told_not_to(setting, expected):
    pytest.importorskip("torch")
    env = {"MLXPOST_CPU_MALLOC": setting} if setting else {}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == expected
