"""Data-parallel training: 2 ranks on loopback against 1 rank with the same global batch.

torch: `torchrun --standalone --nproc_per_node 2` (gloo); MLX: `mlx.launch -n 2 --backend
ring`. Each launch runs a list of jobs in one process group (tests/distributed_jobs.py):
sft and dpo for a few steps through the CLI, and one GRPO / PPO update on fixed rollouts
split across the ranks. Then: one run directory from a 2-rank run, resuming it on 1 rank,
and a killed rank ending the run with a clear message.

Agreement is float32's, 1e-5 relative: each step's loss and gradient norm, and the weights
(in norm). The CLI runs' weights are compared as one vector: a LoRA B matrix starts at 0 and
holds only a few AdamW steps, about lr * sign(gradient) per element, which turns rounding in
near-zero gradient elements into 1e-5 of that matrix alone. The fixed-rollout updates use
an AdamW eps far above the gradients (an update of lr * gradient) and compare each tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlxpost import assets, distributed
from mlxpost.backend_shared.training import global_weights, normalise_weights

pytest.importorskip("torch")

JOBS = str(Path(__file__).with_name("distributed_jobs.py"))
ROOT = str(Path(__file__).resolve().parents[1])
BIN = Path(sys.executable).parent
TOLERANCE = 1e-5
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLX_RANK", "MLX_HOSTFILE")
LAUNCHER_VARIABLES += ("MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR")

SFT = [
    "sft",
    "--steps",
    "5",
    "--batch-size",
    "4",
    "--max-length",
    "128",
    "--learning-rate",
    "1e-3",
    "--eval-math",
    "0",
    "--eval-text",
    "0",
    "--eval-limit",
    "4",
    "--eval-every",
    "0",
    "--save-every",
    "3",
]
DPO = [
    "dpo",
    "--steps",
    "5",
    "--batch-size",
    "4",
    "--max-length",
    "128",
    "--learning-rate",
    "1e-3",
    "--eval-limit",
    "2",
    "--eval-every",
    "0",
    "--save-every",
    "0",
]
GRPO = [
    "grpo",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--num-generations",
    "2",
    "--max-new-tokens",
    "8",
    "--eval-every",
    "0",
    "--eval-math",
    "2",
    "--save-every",
    "1",
]
# One update on fixed rollouts: (name, algorithm, options). Each aggregation's normaliser,
# batch-std advantages, sequence ratios, accumulation, the KL term; PPO's whitening.
UPDATES = [
    ("grpo", "grpo", {"grad_accum": 2, "kl_beta": 0.04}),
    ("dapo-batch-std", "grpo", {"aggregation": "dapo", "grad_accum": 2, "advantage": "batch"}),
    ("bnpo", "grpo", {"aggregation": "bnpo"}),
    ("dr-grpo-gspo", "grpo", {"aggregation": "dr_grpo", "importance": "sequence"}),
    ("ppo", "ppo", {"minibatches": 1, "ppo_epochs": 1, "target_kl": 0, "critic": "shared"}),
    # sharded full fine-tuning: the KL to the base checkpoint, 2 microbatches on each rank
    ("grpo-fsdp", "grpo", {"lora": False, "fsdp": True, "grad_accum": 2, "kl_beta": 0.04}),
]
MLX_UPDATES = [UPDATES[1], UPDATES[4]]


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)  # a test run under a launcher must not look like a rank
    return env


def run(args, timeout=600):
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=environment()
    )


def launch(launcher: str, ranks: int, args: list) -> list:
    if ranks == 1:
        return [sys.executable, *args]
    if launcher == "torch":
        return [BIN / "torchrun", "--standalone", "--nproc_per_node", ranks, *args]
    return [BIN / "mlx.launch", "-n", ranks, "--backend", "ring", "--", sys.executable, *args]


def head(command: str, lines: int, path: Path) -> str:
    """The first lines of the command's bundled data: tokenising all of it takes seconds."""
    with open(assets.default_data(command)) as f:
        path.write_text("".join(f.readline() for _ in range(lines)))
    return str(path)


def jobs(backend: str, root: Path, tag: str, updates, with_dpo: bool, with_grpo: bool) -> str:
    common = ["--backend", backend]
    if backend == "mlx":  # MLX compiles each new batch shape, slowly on these CPUs
        common += ["--steps", "3", "--max-length", "64"]
    examples = ["--data", str(root / "examples.jsonl")]
    out = [{"cli": [*SFT, *common, *examples, "--output", str(root / f"sft-{tag}")]}]
    if with_dpo:  # and the other torch-only runs: full fine-tuning, rm, FSDP
        pairs = ["--data", str(root / "pairs.jsonl")]
        full = [*SFT, *common, *examples, "--steps", "3", "--full", "--learning-rate", "1e-4"]
        rm = ["rm", *DPO[1:], *common, *pairs, "--steps", "3"]
        # --fsdp on one process shards nothing: its runs are the plain full fine-tuning ones.
        fsdp = ["--full", "--fsdp", "--learning-rate", "1e-4"]
        out += [
            {"cli": [*full, "--output", str(root / f"sft-full-{tag}")]},
            {"cli": [*DPO, *common, *pairs, "--output", str(root / f"dpo-{tag}")]},
            {"cli": [*rm, "--output", str(root / f"rm-{tag}")]},
            {
                "cli": [
                    *full,
                    *fsdp,
                    "--grad-accum",
                    "2",
                    "--save-every",
                    "2",
                    "--output",
                    str(root / f"sft-fsdp-{tag}"),
                ]
            },
            {
                "cli": [
                    *DPO,
                    *common,
                    *pairs,
                    *fsdp,
                    "--steps",
                    "3",
                    "--output",
                    str(root / f"dpo-fsdp-{tag}"),
                ]
            },
            {"cli": [*rm, *fsdp, "--output", str(root / f"rm-fsdp-{tag}")]},
        ]
    for name, algorithm, options in updates:
        update = {"backend_name": backend, "algorithm": algorithm, "options": options}
        out.append({"update": {**update, "output": str(root / f"{name}-{tag}.npz")}})
    if with_grpo:
        out.append({"cli": [*GRPO, "--backend", backend, "--output", str(root / f"grpo-{tag}")]})
        sharded = [*GRPO, "--backend", backend, "--full", "--fsdp", "--kl-beta", "0.1"]
        out.append({"cli": [*sharded, "--output", str(root / f"grpo-fsdp-{tag}")]})
    return json.dumps(out)


def run_jobs(launcher: str, root: Path, updates, with_dpo: bool) -> Path:
    """The jobs on 1 rank (no launcher) and on 2 ranks; the 2-rank torch launch also trains
    GRPO end to end."""
    head("sft", 64, root / "examples.jsonl")
    head("dpo", 16, root / "pairs.jsonl")
    for ranks in (1, 2):
        with_grpo = ranks == 2 and launcher == "torch"
        spec = jobs(launcher, root, str(ranks), updates, with_dpo, with_grpo)
        result = run(launch(launcher, ranks, [JOBS, spec]))
        assert result.returncode == 0, result.stderr[-3000:]
        (root / f"stdout-{ranks}").write_text(result.stdout)
        (root / f"stderr-{ranks}").write_text(result.stderr)
    return root


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    return run_jobs("torch", tmp_path_factory.mktemp("torch-dp"), UPDATES, with_dpo=True)


@pytest.fixture(scope="module")
def mlx_runs(tmp_path_factory):
    pytest.importorskip("mlx.core")
    return run_jobs("mlx", tmp_path_factory.mktemp("mlx-dp"), MLX_UPDATES, with_dpo=False)


def assert_same_weights(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    """Each tensor within `tolerance` relative, in norm."""
    assert set(a) == set(b)
    worst = max(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-30) for k in a)
    assert worst <= tolerance, f"largest relative difference {worst:.3g} (tolerance {tolerance})"


# A reward model's head bias: the Bradley-Terry loss depends on score differences only, so its
# gradient is zero but for rounding, and AdamW turns that rounding into steps of up to about
# the learning rate whose sign rounding decides. It is held to that bound, not to the weights'.
ROUNDING_ONLY = "score.bias"


def assert_same_run(one: Path, two: Path, tolerance: float = TOLERANCE) -> None:
    """The trained weights as one vector, and each step's loss and gradient norm, within
    `tolerance` relative; the same tokens each step."""
    a, b = final_weights(one), final_weights(two)
    assert set(a) == set(b)
    if ROUNDING_ONLY in a:
        config = dict(
            line.split(": ", 1) for line in (one / "config.yaml").read_text().splitlines()
        )
        steps, lr = int(config["steps"]), float(config["learning_rate"])
        drift = float(np.abs(a.pop(ROUNDING_ONLY) - b.pop(ROUNDING_ONLY)).max())
        assert drift <= 2 * steps * lr, f"the head bias moved {drift:.3g} apart"
    difference = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a))
    relative = difference / np.sqrt(sum(np.sum(a[k] ** 2) for k in a))
    assert relative <= tolerance, f"weights differ by {relative:.3g} relative"
    rows = [
        [row for row in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in row]
        for run in (one, two)
    ]
    assert len(rows[0]) == len(rows[1])
    for first, second in zip(*rows):
        for key in ("loss", "grad_norm"):
            assert second[key] == pytest.approx(first[key], rel=tolerance), (first["step"], key)
        assert second["tokens"] == first["tokens"]  # the sum over the ranks


def final_weights(run_dir: Path) -> dict:
    with np.load(run_dir / "final" / "trainable.npz") as data:
        return dict(data)


def npz(path: Path) -> dict:
    with np.load(path) as data:
        return dict(data)


# ---- the engines, against one process ----


@pytest.mark.parametrize(
    "command", ["sft", "sft-full", "dpo", "rm", "sft-fsdp", "dpo-fsdp", "rm-fsdp"]
)
def test_torch_two_ranks_train_what_one_does(torch_runs, command):
    """FSDP's runs included: 2 ranks each holding half of every weight, gradient and moment
    (the checkpoints hold them whole) train what one process does."""
    assert_same_run(torch_runs / f"{command}-1", torch_runs / f"{command}-2")
    if command.endswith("fsdp"):
        # The AdamW moments, each kind as one vector: tensors whose gradient is zero but for
        # rounding (the reward head's bias under Bradley-Terry) hold moments of rounding alone.
        one, two = (
            npz(torch_runs / f"{command}-{ranks}" / "final" / "optimizer.npz") for ranks in (1, 2)
        )
        for slot in ("m.", "v."):
            names = [k for k in one if k.startswith(slot)]
            assert names and set(names) == {k for k in two if k.startswith(slot)}
            a, b = (np.concatenate([state[k].ravel() for k in names]) for state in (one, two))
            assert np.linalg.norm(a - b) <= TOLERANCE * np.linalg.norm(a), slot
        # and the 2-rank runs did shard (the 1-rank ones had nothing to shard)
        sharded = "fsdp: each of the 2 ranks holds its share of the weights"
        assert (torch_runs / "stderr-2").read_text().count(sharded) == 4  # and grpo's
        assert (torch_runs / "stderr-1").read_text().count("--fsdp: one process") == 3


@pytest.mark.parametrize("name", [name for name, _, _ in UPDATES])
def test_torch_update_on_split_rollouts_is_the_one_process_update(torch_runs, name):
    assert_same_weights(npz(torch_runs / f"{name}-1.npz"), npz(torch_runs / f"{name}-2.npz"))
    one = json.loads((torch_runs / f"{name}-1.npz.json").read_text())
    two = json.loads((torch_runs / f"{name}-2.npz.json").read_text())
    for key in ("loss", "grad_norm", "tokens", "reward" if "reward" in one else "score"):
        assert two[key] == pytest.approx(one[key], rel=TOLERANCE), key
    if "reward_std" in one:  # over every rank's rewards, not a mean of the ranks'
        assert two["reward_std"] == pytest.approx(one["reward_std"], rel=1e-12)


def test_torch_two_ranks_write_one_run_directory(torch_runs):
    for command, steps in (("sft", 5), ("dpo", 5), ("grpo", 2)):
        run_dir = torch_runs / f"{command}-2"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows if "loss" in row] == list(range(1, steps + 1))
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
        assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    checkpoints = sorted(os.listdir(torch_runs / "grpo-2" / "checkpoints"))
    assert checkpoints == ["step-1"]  # the last step is final/
    # Rank 0 alone prints the final JSON object of each command.
    assert (torch_runs / "stdout-2").read_text().count('"command":') == 9


def test_torch_sharded_grpo_samples_evaluates_and_trains_on_two_ranks(torch_runs):
    """GRPO with --full --fsdp end to end: sampling and the held-out evaluation gather the
    sharded model on every rank; the behaviour logprobs match the trainer's to rounding."""
    rows = [json.loads(line) for line in (torch_runs / "grpo-fsdp-2" / "metrics.jsonl").open()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert "math_accuracy" in rows[0] and "math_accuracy" in rows[-1]
    assert all(row["logprob_gap"] < 1e-4 for row in steps)
    assert steps[1]["kl"] > 0  # the reference is the base checkpoint, the policy has moved
    assert (torch_runs / "grpo-fsdp-2" / "final" / "model.safetensors").is_file()


def test_torch_run_resumes_on_another_number_of_ranks(torch_runs, tmp_path):
    """The 2-rank sft run, resumed from its step-3 checkpoint on 1 rank, ends where the
    1-rank run does."""
    resumed = tmp_path / "sft"
    shutil.copytree(torch_runs / "sft-2", resumed)
    shutil.rmtree(resumed / "final")
    result = run(
        [sys.executable, "-m", "mlxpost.cli", "sft", "--resume", "--output", resumed, "--steps", 5]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "step-3" in result.stderr
    assert_same_run(torch_runs / "sft-1", resumed)


def test_torch_fsdp_run_resumes_on_two_ranks(torch_runs, tmp_path):
    """The sharded sft run resumed from its step-2 checkpoint on 2 sharded ranks (each loads
    its share of the whole arrays) ends where the uninterrupted run does."""
    resumed = tmp_path / "sft-fsdp"
    shutil.copytree(torch_runs / "sft-fsdp-2", resumed)
    shutil.rmtree(resumed / "final")
    cli = ["-m", "mlxpost.cli", "sft", "--resume", "--output", resumed, "--steps", 3]
    result = run(launch("torch", 2, cli))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "step-2" in result.stderr
    assert_same_run(torch_runs / "sft-fsdp-1", resumed)


def rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds ranks through /proc")
def test_killing_a_rank_ends_the_run_and_resume_continues(tmp_path):
    output = tmp_path / "run"
    data = ["--data", head("sft", 64, tmp_path / "examples.jsonl")]
    args = [*SFT[:1], "--backend", "torch", *data, *SFT[3:], "--steps", "100", "--save-every", "2"]
    command = launch("torch", 2, ["-m", "mlxpost.cli", *args, "--output", output])
    process = subprocess.Popen(
        [str(a) for a in command],
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (output / "checkpoints" / "step-2" / "state.json").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("error: rank 0")]
    assert lines, stderr[-3000:]
    assert "lost contact with the other ranks" in lines[0] or "stopped by the launcher" in lines[0]
    assert f"mlxpost sft --resume --output {output}" in lines[0]
    # The kill lands some time after step-2 is written; later checkpoints may exist by then.
    done = (output / "checkpoints").glob("step-*/state.json")
    saved = max(int(p.parent.name.split("-")[1]) for p in done)
    resume = [sys.executable, "-m", "mlxpost.cli", "sft", "--resume", "--output", output]
    result = run([*resume, "--steps", saved + 1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step-{saved}" in result.stderr
    assert json.loads((output / "summary.json").read_text())["steps"] == saved + 1


# ---- MLX over mx.distributed ----


def test_mlx_two_ranks_train_what_one_does(mlx_runs):
    assert_same_run(mlx_runs / "sft-1", mlx_runs / "sft-2")
    rows = [json.loads(row) for row in (mlx_runs / "sft-2" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert (mlx_runs / "stdout-2").read_text().count('"command":') == 1


@pytest.mark.parametrize("name", [name for name, _, _ in MLX_UPDATES])
def test_mlx_update_on_split_rollouts_is_the_one_process_update(mlx_runs, name):
    assert_same_weights(npz(mlx_runs / f"{name}-1.npz"), npz(mlx_runs / f"{name}-2.npz"))


# ---- the pieces, in one process ----


@pytest.mark.parametrize("size", [1, 2, 3, 8])
@pytest.mark.parametrize("count", [8, 9, 16, 17])
def test_shards_cover_the_batch_once_in_order(size, count):
    indices = np.random.default_rng(count).permutation(100)[:count]
    shares = [distributed.shard(indices, FakeWorld(rank, size)) for rank in range(size)]
    assert np.array_equal(np.concatenate(shares), indices)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_batch_smaller_than_the_ranks_is_refused():
    with pytest.raises(distributed.UserError, match="--batch-size 2 is smaller than the 4 ranks"):
        distributed.shard(np.arange(2), FakeWorld(0, 4))


def test_rank_seeds_differ_and_rank_0_keeps_the_seed():
    seeds = [distributed.rank_seed(7, FakeWorld(rank, 4)) for rank in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4


@pytest.mark.parametrize(
    "env,which,rank",
    [
        ({}, None, 0),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "torch", 1),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, None, 0),
        ({"MLX_RANK": "1", "MLX_HOSTFILE": "/tmp/hosts.json"}, "mlx", 1),
        ({"MLX_RANK": "0", "MLX_HOSTFILE": ""}, None, 0),
        ({"MLX_RANK": "3", "MLX_WORLD_SIZE": "4"}, "mlx", 3),
    ],
)
def test_the_launcher_is_read_from_its_environment(monkeypatch, env, which, rank):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.launcher() == which
    assert distributed.launched_rank() == rank


@pytest.mark.parametrize("weights", [None, [1.0, 3.0], [0.0, 0.0], [2.0, 0.0]])
def test_one_rank_weights_are_the_normalised_ones(weights):
    got = global_weights(2, weights, distributed.World())
    expected = normalise_weights(2, weights if weights and sum(weights) else None)
    assert got == pytest.approx(expected)


def test_metrics_of_one_rank_pass_through():
    metrics = {"loss": 1.0, "tokens": 5.0}
    assert distributed.reduce_metrics(metrics) == metrics


class FakeWorld(distributed.World):
    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
