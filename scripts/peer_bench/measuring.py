"""What every worker measures with: step timers, peak memory, the rows and pairs it trains on,
and the result it hands back. Frameworks are imported only when a worker asks for them."""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time

import numpy as np


class PeerUnavailable(Exception):
    """A peer that cannot be imported or cannot run here: reported, not a crash."""


def import_peer(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(
            f"cannot import {module} ({err}); install {package} with pip install 'mlxpost[bench]'"
        ) from err


def torch_setup(spec: dict):
    import torch

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    torch.manual_seed(spec.get("seed", 0))
    return torch


# ---- time ----


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Steps:
    """Wall and CPU seconds of each optimizer step, timed by begin()/end() around it or
    added from a tool's own per-step timer (add)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._begun = (time.perf_counter(), cpu_seconds())

    def begin(self) -> None:
        self._begun = (time.perf_counter(), cpu_seconds())

    def end(self) -> None:
        wall, cpu = self._begun
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(cpu_seconds() - cpu)

    def add(self, wall: float) -> None:
        """A step timed by the tool itself; CPU counted since the previous step ended."""
        self.wall.append(wall)
        self.cpu.append(cpu_seconds() - self._begun[1])
        self._begun = (time.perf_counter(), cpu_seconds())

    def fields(self, warmup: int) -> dict:
        return {
            "warmup_seconds": self.wall[:warmup],
            "step_seconds": self.wall[warmup:],
            "step_cpu_seconds": self.cpu[warmup:],
        }


# ---- memory ----


def ru_maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_peak_mib() -> float:
    """This process's peak resident set: VmHWM on Linux (the high-water mark of its own
    address space), else ru_maxrss. On Linux ru_maxrss survives fork + exec, so a worker's
    can be its parent's resident set at the fork rather than its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return ru_maxrss_mib()


def alloc_peak_mib(framework: str) -> float | None:
    """The framework allocator's peak: MLX's, torch's on CUDA; torch on CPU keeps none."""
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    import mlx.core as mx

    return mx.get_peak_memory() / 2**20


# ---- what a worker trains on ----


def split_rows(stream: np.ndarray, seq_len: int, rows: int) -> np.ndarray:
    """The first `rows` consecutive rows of `seq_len` tokens of a 1-D token stream."""
    if stream.size < rows * seq_len:
        raise ValueError(f"token stream of {stream.size} tokens is shorter than {rows}x{seq_len}")
    return stream[: rows * seq_len].reshape(rows, seq_len)


def sft_rows(spec: dict) -> np.ndarray:
    """Every row the run trains on: batch x (warmup + steps) rows of seq_len tokens."""
    plan = spec["plan"]
    count = plan["sft_batch"] * (plan["warmup"] + plan["steps"])
    stream = np.load(spec["data"]["sft_stream"])
    return split_rows(stream, plan["sft_seq_len"], count)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_pairs(spec: dict, count: int) -> str:
    """The first `count` long pairs (one epoch of the run), as conversational jsonl."""
    pairs = read_jsonl(spec["data"]["dpo_pairs"][str(spec["plan"]["dpo_length"])])
    if len(pairs) < count:
        raise ValueError(f"only {len(pairs)} DPO pairs are long enough; the plan needs {count}")
    path = os.path.join(os.getcwd(), f"dpo-pairs-{count}.jsonl")
    with open(path, "w") as f:
        for pair in pairs[:count]:
            f.write(json.dumps(pair) + "\n")
    return path


# ---- what a worker hands back ----


def measured(spec: dict, steps: Steps, units: str, units_per_step: float, extra: dict) -> dict:
    """A worker's result: the timed steps (after the plan's warmup) and what each did."""
    return {
        "status": "ok",
        "units": units,
        "units_per_step": float(units_per_step),
        **steps.fields(spec["plan"]["warmup"]),
        "alloc_peak_mib": alloc_peak_mib(spec["framework"]),
        "extra": extra,
    }


def grpo_result(spec: dict, steps: Steps, sampled: list[tuple[float, int]], extra: dict) -> dict:
    """sampled: (seconds, completion tokens) of each step's sampling call."""
    plan = spec["plan"]
    timed = sampled[plan["warmup"] :]
    extra = dict(extra)
    extra["sampling_seconds"] = [s for s, _ in timed]
    extra["completion_tokens"] = [n for _, n in timed]
    expected = plan["grpo_prompts"] * plan["grpo_generations"] * plan["grpo_new_tokens"]
    odd = sorted({n for _, n in timed if n != expected})
    if odd:
        note = f"generated {odd} tokens in some steps, not {expected}"
        extra["note"] = "; ".join(filter(None, [extra.get("note"), note]))
    return measured(spec, steps, "steps", 1.0, extra)
