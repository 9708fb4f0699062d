"""The parent process: picks the jobs, runs each (and the models, data and calibration they
need) in its own worker subprocess, and collects the results and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from importlib import metadata

from .plan import PLANS, QUICK_PLANS, ROOT, SCRIPT, TOOLS, Plan
from .report import fmt
from .results import Result

PACKAGES = (
    "mlxpost",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "mlx",
    "mlx-lm",
    "mlx-lm-lora",
    "numpy",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_worker(spec: dict, workdir: str, timeout: int, preload: str = "") -> dict:
    """Run one measurement in a subprocess; its result dict (or a failure). `preload`: a
    library for LD_PRELOAD (an optimised BLAS for MLX workers)."""
    name = f"{spec['task']}-{spec['model']}-{spec['tool']}-{spec.get('repeat', 0)}"
    workdir = os.path.join(workdir, name)  # the worker's cwd: its run directories, adapters
    os.makedirs(workdir, exist_ok=True)
    spec_path = os.path.join(workdir, "spec.json")
    out_path = os.path.join(workdir, "result.json")
    log_path = os.path.join(workdir, "log.txt")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("WANDB_DISABLED", "true")
    if preload:
        env["LD_PRELOAD"] = " ".join(filter(None, [preload, env.get("LD_PRELOAD")]))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, SCRIPT, "--worker", spec_path, out_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=workdir,
                env=env,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.perf_counter() - start
    if os.path.isfile(out_path):
        with open(out_path) as f:
            result = json.load(f)
    elif code is None:
        result = {"status": "failed", "reason": f"timed out after {timeout} s (--timeout)"}
    else:
        with open(log_path, errors="replace") as f:
            tail = [line.strip() for line in f if line.strip()][-1:]
        result = {
            "status": "failed",
            "reason": f"worker exited with status {code}: {tail[0] if tail else 'no output'}",
        }
    result["wall_seconds"] = wall
    result["log"] = log_path
    return result


def selected_jobs(args) -> list[tuple[str, str, str, str]]:
    """(task, model, framework, tool) in run order: per model, per task, per framework."""
    jobs = []
    for model in args.models:
        for task in args.tasks:
            for framework in ("torch", "mlx"):
                for tool in args.tools:
                    tool_framework, tool_tasks = TOOLS[tool]
                    if tool_framework == framework and task in tool_tasks:
                        jobs.append((task, model, framework, tool))
    return jobs


def selected_plans(args) -> dict[tuple[str, str], Plan]:
    """The plans (--quick's or the full ones) with --steps and --warmup applied."""
    plans = QUICK_PLANS if args.quick else PLANS
    return {
        key: replace(
            plan,
            steps=args.steps or plan.steps,
            grpo_steps=args.steps or plan.grpo_steps,
            warmup=plan.warmup if args.warmup is None else args.warmup,
        )
        for key, plan in plans.items()
    }


def preload(args, framework: str) -> str:
    return args.mlx_preload if framework == "mlx" else ""


def prepare(args, jobs: list, plans: dict, root: str, workdir: str) -> dict:
    """Models and data, built in a subprocess too: a parent that imported torch and built the
    124M model would be over 1 GiB, and a forked worker's ru_maxrss starts from its parent's
    resident set."""
    frameworks = sorted({job[2] for job in jobs})
    prepared = run_worker(
        {
            "task": "prepare",
            "model": "all",
            "tool": "prepare",
            "root": root,
            "models": args.models,
            "mlx_lm_models": sorted({j[1] for j in jobs if j[3] in ("mlx-lm", "mlx-lm-lora")}),
            "plans": {m: [asdict(plans[(m, fw)]) for fw in frameworks] for m in args.models},
            "seed": args.seed,
        },
        workdir,
        args.timeout,
    )
    if prepared.get("status") != "ok":
        raise SystemExit(f"could not build the models and data: {prepared.get('reason')}")
    for model in args.models:
        data = prepared["data"][model]
        say(
            f"data for {model}: GRPO prompts of {data['grpo_prompt_length']} tokens; "
            f"DPO pairs long enough (by row length): {data['dpo_pair_count']}"
        )
    return prepared


def calibrate(args, frameworks: list[str], workdir: str) -> dict[str, dict]:
    """framework -> its float32 matmul FLOP/s (the peak MFU is measured against)."""
    calibration = {}
    for framework in frameworks:
        spec = {
            "task": "matmul",
            "model": "none",
            "tool": framework,
            "size": args.matmul_size,
            "torch_threads": args.torch_threads,
        }
        say(f"calibrating {framework}: float32 {args.matmul_size}^2 matmul")
        calibration[framework] = run_worker(spec, workdir, args.timeout, preload(args, framework))
        peak = calibration[framework].get("flops")
        say(f"  {framework}: {fmt(peak and peak / 1e9, '.1f')} GFLOP/s")
    return calibration


def job_result(job: tuple, plan: Plan, raw: dict) -> Result:
    """A worker's result dict as a Result; the figures say() reports it with."""
    task, model, framework, tool = job
    result = Result(
        task=task,
        model=model,
        framework=framework,
        tool=tool,
        shape=plan.shape(task),
        status=raw.get("status", "failed"),
        reason=raw.get("reason", ""),
        warmup=plan.warmup,
        steps=len(raw.get("step_seconds", [])),
        step_seconds=raw.get("step_seconds", []),
        step_cpu_seconds=raw.get("step_cpu_seconds", []),
        warmup_seconds=raw.get("warmup_seconds", []),
        units=raw.get("units", ""),
        units_per_step=raw.get("units_per_step", 0.0),
        peak_rss_mib=raw.get("peak_rss_mib"),
        alloc_peak_mib=raw.get("alloc_peak_mib"),
        extra={**raw.get("extra", {}), "ru_maxrss_mib": raw.get("ru_maxrss_mib")},
        wall_seconds=raw.get("wall_seconds", 0.0),
    )
    if result.ok:
        say(
            f"     {result.rate():10.2f} {result.units}/s  median step "
            f"{result.median_step():.3f} s  CPU/wall {result.cpu_per_wall():.2f}  "
            f"(subprocess {result.wall_seconds:.0f} s)"
        )
    else:
        say(f"     {result.status}: {result.reason}  (log: {raw.get('log')})")
    return result


def run_jobs(args, jobs: list, plans: dict, prepared: dict, workdir: str) -> list[Result]:
    """Every job, --repeat times round-robin (so slow spells of the machine spread), the
    repeats of a job pooled into one Result."""
    pooled: dict[tuple, Result] = {}
    for repeat in range(args.repeat):
        for job in jobs:
            task, model, framework, tool = job
            plan = plans[(model, framework)]
            spec = {
                "task": task,
                "model": model,
                "framework": framework,
                "tool": tool,
                "repeat": repeat,
                "model_dir": prepared["paths"][model],
                "mlx_lm_dir": prepared["mlx_paths"].get(model),
                "plan": asdict(plan),
                "data": prepared["data"][model],
                "seed": args.seed,
                "torch_threads": args.torch_threads,
                "dpo_reference": "live" if framework == "mlx" else "precompute",
            }
            label = f"[{repeat + 1}/{args.repeat}] " if args.repeat > 1 else ""
            say(f"{label}{task:<4} {model:<9} {tool:<13} {plan.shape(task):<10} ...")
            raw = run_worker(spec, workdir, args.timeout, preload(args, framework))
            result = job_result(job, plan, raw)
            key = (task, model, tool)
            if key in pooled:
                pooled[key].merge(result)
            else:
                pooled[key] = result
    return list(pooled.values())


def machine_info(calibration: dict, load_before: str, args) -> dict:
    info = {
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "not set",
        "LD_PRELOAD": os.environ.get("LD_PRELOAD") or "not set",
        "LD_PRELOAD of MLX workers (--mlx-preload)": args.mlx_preload or "none",
        "torch threads set (--torch-threads)": args.torch_threads or "no (torch's default)",
        "repeats (--repeat)": args.repeat,
        "niceness": os.nice(0) if hasattr(os, "nice") else "unknown",
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    torch_cal = calibration.get("torch", {})
    if "threads" in torch_cal:
        info["torch_threads"] = torch_cal["threads"]
        info["torch_interop_threads"] = torch_cal.get("interop_threads")
    mlx_cal = calibration.get("mlx", {})
    if "device" in mlx_cal:
        info["mlx_device"] = mlx_cal["device"]
    return info


def measure(args) -> dict:
    """Every selected job measured, with what the report says about the run."""
    wall_start = time.perf_counter()
    load_before = load_average()
    plans = selected_plans(args)
    jobs = selected_jobs(args)
    if not jobs:
        raise SystemExit("nothing selected: check --tasks, --tools and --models")
    root = tempfile.mkdtemp(prefix="mlxpost-bench-peers-")
    try:
        say(f"working in {root}")
        workdir = os.path.join(root, "work")
        os.makedirs(workdir, exist_ok=True)
        prepared = prepare(args, jobs, plans, root, workdir)
        calibration = calibrate(args, sorted({job[2] for job in jobs}), workdir)
        results = run_jobs(args, jobs, plans, prepared, workdir)
    finally:
        if args.keep_temp:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    return {
        "results": results,
        "calibration": calibration,
        "configs": prepared["configs"],
        "plans": {f"{m}/{fw}": asdict(p) for (m, fw), p in plans.items() if m in args.models},
        "data": {
            m: {k: d[k] for k in ("grpo_prompt_length", "dpo_pair_count")}
            for m, d in prepared["data"].items()
        },
        "machine": machine_info(calibration, load_before, args),
        "versions": package_versions(),
        "wall_seconds": time.perf_counter() - wall_start,
    }
