"""A worker subprocess (``bench_peers.py --worker SPEC OUT``): one measurement, written to OUT
as JSON with the process's peak memory, whether it ran, failed or its peer is missing."""

from __future__ import annotations

import json
import traceback

from .measuring import PeerUnavailable, rss_peak_mib, ru_maxrss_mib
from .prepare import worker_matmul, worker_prepare
from .tool_mlx_lm import worker_sft_mlx_lm
from .tool_mlx_lm_lora import worker_dpo_mlx_lm_lora, worker_grpo_mlx_lm_lora
from .tool_mlxpost import worker_dpo_mlxpost, worker_grpo_mlxpost, worker_sft_mlxpost
from .tool_trl import worker_dpo_trl, worker_grpo_trl, worker_sft_trl

WORKERS = {  # (task, tool) -> the function that measures it
    ("prepare", "prepare"): worker_prepare,
    ("matmul", "torch"): worker_matmul,
    ("matmul", "mlx"): worker_matmul,
    ("sft", "mlxpost-torch"): worker_sft_mlxpost,
    ("sft", "mlxpost-mlx"): worker_sft_mlxpost,
    ("sft", "trl"): worker_sft_trl,
    ("sft", "mlx-lm"): worker_sft_mlx_lm,
    ("grpo", "mlxpost-torch"): worker_grpo_mlxpost,
    ("grpo", "mlxpost-mlx"): worker_grpo_mlxpost,
    ("grpo", "trl"): worker_grpo_trl,
    ("grpo", "mlx-lm-lora"): worker_grpo_mlx_lm_lora,
    ("dpo", "mlxpost-torch"): worker_dpo_mlxpost,
    ("dpo", "mlxpost-mlx"): worker_dpo_mlxpost,
    ("dpo", "trl"): worker_dpo_trl,
    ("dpo", "mlx-lm-lora"): worker_dpo_mlx_lm_lora,
}


def worker_main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = WORKERS[(spec["task"], spec["tool"])](spec)
    except PeerUnavailable as err:
        result = {"status": "not available", "reason": str(err)}
    except Exception as err:  # report the row as failed; the run goes on
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:300]}
    result["peak_rss_mib"] = rss_peak_mib()
    result["ru_maxrss_mib"] = ru_maxrss_mib()
    with open(out_path, "w") as f:
        json.dump(result, f, default=float)
