"""Peer benchmark: mlxpost against TRL, mlx-lm's LoRA trainer and mlx-lm-lora, on the same work.

One invocation measures every selected (task, model, tool) and writes a markdown report
(default docs/bench_peers.md; ``--json FILE`` for the raw figures). Tools are compared within
their framework: mlxpost's torch backend against TRL (PyTorch), mlxpost's MLX backend against
mlx-lm (``mlx_lm.tuner.trainer.train``, what ``mlx_lm.lora`` runs) and mlx-lm-lora (MLX).

How every measurement is taken (the same for all tools)
------------------------------------------------------
* Each (task, model, tool) runs in its own Python subprocess (this script with ``--worker``),
  so imports, allocator state and peak memory never leak between tools. The subprocess
  loads the tokenizer and model, attaches LoRA, builds the tool's trainer and runs
  ``warmup + steps`` optimizer steps through the tool's own training loop; only the last
  ``steps`` are timed. ``--repeat N`` runs the whole list N times round-robin and pools the
  timed steps, which evens out a machine whose load changes.
* A step's time is read in-process with ``time.perf_counter``:
  mlxpost: around ``Backend.train_step`` (SFT) or the algorithm's ``train_step(step)``
  (GRPO, DPO: sampling, rewards, the optimizer step); TRL: a ``TrainerCallback`` from
  ``on_step_begin`` to ``on_step_end`` (the whole ``training_step`` and optimizer step;
  for GRPO generation and scoring happen inside it); mlx-lm and mlx-lm-lora: their own
  per-step timer, reported through a ``TrainingCallback`` with ``steps_per_report=1``
  (from after the batch is drawn until ``mx.eval`` of the updated state). Throughput is
  units done in the timed steps / the sum of their seconds; ``s/step`` is the median. The
  process's CPU time (all threads) is read at the same boundaries: 'CPU/wall' near the
  thread count means the step had the CPUs; far below it, it waited for them.
* Memory: the subprocess's peak resident set (imports, tokenizer, model, data and training
  together): ``VmHWM`` from /proc/self/status on Linux, else
  ``getrusage(RUSAGE_SELF).ru_maxrss``. (On Linux ru_maxrss is carried over fork + exec, so
  a worker's can be its parent's size; it is kept in ``--json`` as ``ru_maxrss_mib``, and
  the models and data are built in a subprocess so the parent stays small.) Plus the
  framework allocator's peak where one exists (``mx.get_peak_memory()`` for MLX;
  ``torch.cuda.max_memory_allocated()`` on CUDA; torch on CPU keeps none: n/a).
* Common settings: float32 weights and compute everywhere (TRL's bf16 default and its
  gradient-checkpointing default are switched off, as mlxpost does neither), LoRA rank 8,
  alpha 16 (mlx-lm: scale 2.0 = alpha/rank), dropout 0, on every GPT-2 attention and MLP
  projection (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), AdamW lr 1e-4, weight decay 0;
  the model's own dropout off (mlxpost runs the model in eval mode; TRL gets a model loaded
  with attn/embd/resid dropout 0; mlx-lm's GPT-2 has none). Gradient clipping at norm 1.0
  is on in mlxpost and TRL (their defaults); mlx-lm and mlx-lm-lora do not clip.

The work
--------
* SFT (LoRA): the bundled math data (``math/train.jsonl``) rendered with the chat template,
  concatenated into one token stream and cut into rows of exactly ``seq_len`` tokens, so no
  row has padding; step s trains on rows [s*B, (s+1)*B). Counted tokens = B * seq_len per
  step: every input token the model processes (none is padding). mlxpost gets the rows as
  (input_ids, attention_mask of ones, loss on every predicted token) with the loss SFT trains
  with (``nll_and_kl_loss``, kl_beta 0); TRL ``SFTTrainer`` gets them as a pre-tokenised
  ``input_ids`` dataset (``packing=False``, ``max_length=seq_len``: nothing to pack, cut or
  pad); mlx-lm gets the same rows as its (tokens, offset) dataset and batches them with its
  own ``iterate_batches`` (with seq_len a multiple of 32 its padding rule adds no input
  column, so its forward pass also sees B x seq_len real tokens).
* GRPO (LoRA): prompts from the bundled ``rl/prompts.jsonl`` rendered with the chat template,
  keeping only those of the most common token length, so every tool's prompts are the same
  length whatever order it draws them in. Each step: ``prompts`` prompts x ``generations``
  samples, exactly ``new_tokens`` new tokens each (EOS-free): mlxpost samples with an EOS id
  that never occurs; TRL gets ``generation_kwargs={"min_new_tokens": new_tokens}`` (EOS
  suppressed until the limit); mlx-lm-lora gets a tokenizer with no EOS ids and no end-answer
  token. Temperature 1.0, no top-k/top-p, KL weight 0 and no reference forward in any
  tool (mlxpost runs with ``log_kl=False``, i.e. ``--no-log-kl``; by default it logs the KL),
  one policy update per batch, per-sequence mean aggregation ("grpo"), group-std
  advantages, and a cheap reward (``bench_reward`` below: share of distinct words). Reported:
  s/step, completion tokens per step (counted from what each sampler returned), and
  sampling tokens/s = completion tokens / seconds inside the tool's sampling call (mlxpost
  ``Rollouts.sample``; TRL ``_generate_single_turn``; mlx-lm-lora ``generate_grpo``),
  prompt prefill included. TRL prefills every sample separately (it repeats each prompt
  ``generations`` times); mlxpost and mlx-lm-lora share one prefill per prompt.
* DPO (LoRA, sigmoid loss, beta 0.1): pairs from the bundled ``preferences/train.jsonl`` as
  conversations whose prompt + chosen and prompt + rejected both render to more than
  ``length`` tokens; every tool truncates them to ``length`` tokens (mlxpost
  ``--on-too-long truncate``; TRL ``max_length``; mlx-lm-lora ``max_seq_length``), so each
  step processes 2 x pairs rows of exactly ``length`` tokens. Reference: torch tools
  precompute the reference logprobs before training (mlxpost's default; TRL
  ``precompute_ref_log_probs=True``), untimed; mlx-lm-lora only has a live reference (a
  second copy of the model run in every step), so mlxpost's MLX backend runs
  ``--reference-mode live`` against it. Reported: pairs/s. mlx-lm-lora's ``train_dpo``
  calls ``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``, a
  key MLX reports only on Metal (KeyError on the CPU and CUDA builds); the worker adds the
  key (the machine's memory) to ``mx.device_info()`` so the trainer can run, and says so.
* MFU (SFT rows): model FLOPs per token (PaLM, Chowdhury et al. 2022, appendix B, adapted to
  LoRA): frozen weights take a forward and an input-gradient pass (2N + 2N), LoRA weights a
  full training pass (6 N_lora), attention 12 * n_layer * d_model * seq_len (QK^T and AV on
  the full seq_len x seq_len matrices, forward and backward):
      FLOPs/token = 4 N + 6 N_lora + 12 n_layer d_model seq_len
  N counts every weight matrix a token is multiplied with (per layer 12 d^2 for GPT-2 with
  4d MLP, plus the vocab x d LM head); embedding look-ups, biases and norms are left out.
  MFU = FLOPs/token x tokens/s / peak, the peak being the best time of a float32
  ``--matmul-size`` square matmul in the same framework (its own subprocess), on this machine.

Models: ``tiny`` is the bundled 3.49M GPT-2 (``mlxpost.assets.DEFAULT_MODEL``);
``gpt2-124m`` is a random GPT-2 with the 124M shape, built in a temporary directory by
``scripts/bench.py``'s ``build_models`` and given the bundled tokenizer (ids < 1024 < its
vocab), so both models see the same token ids. mlx-lm loads GPT-2 only from the original key
layout with ``n_ctx`` in config.json, so MLX peers get a converted copy (same weights).
The 124M model and the MLX tools use smaller plans (see ``PLANS``; MLX's Linux CPU build uses
a reference BLAS, far slower than torch here: ``--mlx-preload`` an optimised one); within a
framework every tool runs the same plan. Torch uses its default thread count unless
``--torch-threads`` says otherwise (on a machine shared with other work, 1 thread gives
steadier figures: two threads that must meet at every kernel wait for each other).

Run (``pip install -c constraints/linux-cpu.txt -e '.[bench]'`` first on CPU-only Linux):

    python scripts/bench_peers.py                  # everything, writes docs/bench_peers.md
    python scripts/bench_peers.py --quick          # 1-2 minute smoke run (tiny model, few steps)
    python scripts/bench_peers.py --tasks sft --tools mlxpost-torch,trl --models tiny
    python scripts/bench_peers.py --json bench_peers.json --markdown ''   # JSON only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)

TASKS = ("sft", "grpo", "dpo")
MODELS = ("tiny", "gpt2-124m")
TOOLS = {  # tool -> (framework, tasks it runs)
    "mlxpost-torch": ("torch", TASKS),
    "trl": ("torch", TASKS),
    "mlxpost-mlx": ("mlx", TASKS),
    "mlx-lm": ("mlx", ("sft",)),
    "mlx-lm-lora": ("mlx", ("grpo", "dpo")),
}
BASELINE = {"torch": "mlxpost-torch", "mlx": "mlxpost-mlx"}
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

LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # mlxpost's GPT-2 default; PEFT suffix names
MLX_LM_LORA_KEYS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LEARNING_RATE = 1e-4
DPO_BETA = 0.1
NEVER_EOS = -1  # no token id is negative: mlxpost samples never stop early


# ---- plans ----


@dataclass
class Plan:
    """The shapes and step counts one (model, framework) pair is measured at."""

    sft_batch: int
    sft_seq_len: int
    grpo_prompts: int
    grpo_generations: int
    grpo_new_tokens: int
    dpo_pairs: int
    dpo_length: int
    warmup: int
    steps: int
    grpo_steps: int
    note: str = ""

    def shape(self, task: str) -> str:
        if task == "sft":
            return f"{self.sft_batch}x{self.sft_seq_len}"
        if task == "grpo":
            return f"{self.grpo_prompts}x{self.grpo_generations}x{self.grpo_new_tokens}"
        return f"{self.dpo_pairs}x{self.dpo_length}"

    def timed_steps(self, task: str) -> int:
        return self.grpo_steps if task == "grpo" else self.steps


PLANS = {  # sft batch, seq_len; grpo prompts, samples, new tokens; dpo pairs, length
    ("tiny", "torch"): Plan(8, 128, 4, 4, 32, 8, 64, warmup=2, steps=10, grpo_steps=5),
    ("tiny", "mlx"): Plan(4, 64, 2, 4, 16, 4, 64, warmup=2, steps=5, grpo_steps=3),
    ("gpt2-124m", "torch"): Plan(4, 128, 2, 4, 32, 4, 64, warmup=1, steps=4, grpo_steps=3),
    ("gpt2-124m", "mlx"): Plan(1, 64, 1, 2, 16, 1, 32, warmup=1, steps=3, grpo_steps=2),
}
QUICK_PLANS = {
    ("tiny", "torch"): Plan(4, 64, 2, 2, 8, 2, 32, warmup=1, steps=2, grpo_steps=2),
    ("tiny", "mlx"): Plan(2, 32, 1, 2, 8, 1, 32, warmup=1, steps=2, grpo_steps=1),
    ("gpt2-124m", "torch"): Plan(1, 32, 1, 2, 4, 1, 32, warmup=1, steps=1, grpo_steps=1),
    ("gpt2-124m", "mlx"): Plan(1, 32, 1, 2, 4, 1, 32, warmup=1, steps=1, grpo_steps=1),
}


# ---- pure helpers (tested in tests/test_bench_peers.py) ----


def gpt2_dims(config: dict) -> tuple[int, int, int, int]:
    """(d_model, n_layer, vocab, MLP inner width) of a GPT-2 config.json."""
    if config.get("model_type") != "gpt2":
        raise ValueError(f"FLOP counts are written for GPT-2, not {config.get('model_type')!r}")
    d = int(config["n_embd"])
    inner = int(config.get("n_inner") or 4 * d)
    return d, int(config["n_layer"]), int(config["vocab_size"]), inner


def matmul_params(config: dict) -> int:
    """N: weights a token is multiplied with: per layer c_attn (d x 3d), attn.c_proj (d x d),
    mlp.c_fc (d x inner), mlp.c_proj (inner x d), plus the (vocab x d) LM head."""
    d, layers, vocab, inner = gpt2_dims(config)
    return layers * (3 * d * d + d * d + 2 * d * inner) + vocab * d


def lora_params(config: dict, rank: int, targets=LORA_TARGETS) -> int:
    """N_lora: rank * (in + out) per adapted matrix (PEFT suffix matching: c_proj is both)."""
    d, layers, _, inner = gpt2_dims(config)
    shapes = {
        "c_attn": [(d, 3 * d)],
        "c_proj": [(d, d), (inner, d)],
        "c_fc": [(d, inner)],
    }
    per_layer = sum(rank * (a + b) for t in set(targets) for a, b in shapes.get(t, []))
    return layers * per_layer


def lora_train_flops_per_token(config: dict, seq_len: int, rank: int, targets=LORA_TARGETS):
    """4 N + 6 N_lora + 12 n_layer d_model seq_len (see the module docstring)."""
    d, layers, _, _ = gpt2_dims(config)
    return (
        4 * matmul_params(config)
        + 6 * lora_params(config, rank, targets)
        + 12 * layers * d * seq_len
    )


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops


def throughput(units_per_step: float, step_seconds: list[float]) -> float:
    """Units per second over the timed steps (total units / total seconds)."""
    total = sum(step_seconds)
    return units_per_step * len(step_seconds) / total if total > 0 else float("nan")


def split_rows(stream: np.ndarray, seq_len: int, rows: int) -> np.ndarray:
    """The first `rows` consecutive rows of `seq_len` tokens of a 1-D token stream."""
    if stream.size < rows * seq_len:
        raise ValueError(f"token stream of {stream.size} tokens is shorter than {rows}x{seq_len}")
    return stream[: rows * seq_len].reshape(rows, seq_len)


def fmt(value, spec: str = ".2f", missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return missing
    return format(value, spec)


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()):
    """A GitHub markdown table; columns in `right` are right-aligned. `|` in cells escaped."""

    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_reward(prompts, completions, **_) -> list[float]:
    """The benchmark's reward: the share of distinct words in a completion (cheap, varied).
    Completions may be strings or TRL's conversational [{"role", "content"}] lists."""
    out = []
    for completion in completions:
        if isinstance(completion, list):
            completion = " ".join(m.get("content", "") for m in completion)
        words = str(completion).split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out


# ---- the parent: data, models, subprocesses, report ----


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


def build_models(names: list[str], root: str, seed: int) -> dict[str, str]:
    """name -> checkpoint directory (Hugging Face layout)."""
    sys.path.insert(0, ROOT)
    from mlxpost import assets

    paths = {}
    if "tiny" in names:
        paths["tiny"] = assets.DEFAULT_MODEL
    if "gpt2-124m" in names:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        import bench  # scripts/bench.py: builds the 124M-shaped model with random weights

        built = bench.build_models(["gpt2-124m"], root, seed)["gpt2-124m"]
        from mlxpost.loop import TOKENIZER_FILES

        for name in TOKENIZER_FILES:  # the bundled tokenizer: the same ids for both models
            source = os.path.join(assets.DEFAULT_MODEL, name)
            target = os.path.join(built, name)
            if os.path.exists(target):
                os.remove(target)
            if os.path.isfile(source):
                shutil.copy(source, target)
        paths["gpt2-124m"] = built
    return paths


def convert_for_mlx_lm(source: str, target: str) -> str:
    """A copy mlx-lm can load: original GPT-2 key names (no `transformer.` prefix, no separate
    lm_head: it is tied) and `n_ctx` in config.json. The weights are the same."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(target, exist_ok=True)
    weights = load_file(os.path.join(source, "model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        if key == "lm_head.weight":
            continue
        renamed[key.removeprefix("transformer.")] = value
    save_file(renamed, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config.setdefault("n_ctx", config["n_positions"])
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    from mlxpost.loop import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)
    return target


def build_data(model_dir: str, root: str, plans: list[Plan]) -> dict[str, str]:
    """The token stream (SFT), equal-length prompts (GRPO) and long pairs (DPO), from the
    bundled data, rendered with the model's chat template."""
    sys.path.insert(0, ROOT)
    from transformers import AutoTokenizer

    from mlxpost import assets

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(messages, generation_prompt=False) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def read(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    os.makedirs(root, exist_ok=True)
    out = {}
    need = max(p.sft_batch * p.sft_seq_len * (p.warmup + p.steps) for p in plans)
    stream: list[int] = []
    for ex in read(assets.default_data("sft")):
        stream += encode(
            [
                {"role": "user", "content": ex["question"]},
                {"role": "assistant", "content": ex["answer"]},
            ]
        )
        if len(stream) >= need:
            break
    out["sft_stream"] = os.path.join(root, "sft_stream.npy")
    np.save(out["sft_stream"], np.asarray(stream, np.int32))

    prompts = read(assets.default_data("grpo"))
    lengths = [len(encode(ex["prompt"], True)) for ex in prompts]
    common = max(set(lengths), key=lengths.count)
    chosen = [ex for ex, n in zip(prompts, lengths) if n == common]
    out["grpo_prompts"] = os.path.join(root, "grpo_prompts.jsonl")
    out["grpo_prompt_length"] = common
    with open(out["grpo_prompts"], "w") as f:
        for ex in chosen:
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex.get("answer", "")}) + "\n")

    # DPO: for each row length L, pairs whose prompt leaves at least 8 completion tokens and
    # whose chosen and rejected conversations both exceed L + 1 tokens (cut to L by every tool)
    rendered = []
    for ex in read(assets.default_data("dpo")):
        prompt = [{"role": "user", "content": ex["prompt"]}]
        chosen_msgs = [{"role": "assistant", "content": ex["chosen"]}]
        rejected_msgs = [{"role": "assistant", "content": ex["rejected"]}]
        pair = {"prompt": prompt, "chosen": chosen_msgs, "rejected": rejected_msgs}
        full = min(len(encode(prompt + chosen_msgs)), len(encode(prompt + rejected_msgs)))
        rendered.append((pair, len(encode(prompt, True)), full))
    out["dpo_pairs"], out["dpo_pair_count"] = {}, {}
    for length in sorted({p.dpo_length for p in plans}):
        pairs = [
            pair for pair, p_len, full in rendered if p_len <= length - 8 and full > length + 1
        ]
        out["dpo_pairs"][str(length)] = os.path.join(root, f"dpo_pairs_{length}.jsonl")
        out["dpo_pair_count"][str(length)] = len(pairs)
        with open(out["dpo_pairs"][str(length)], "w") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
    return out


@dataclass
class Result:
    task: str
    model: str
    framework: str
    tool: str
    shape: str
    status: str  # ok | not available | failed
    reason: str = ""
    warmup: int = 0
    steps: int = 0
    step_seconds: list = field(default_factory=list)
    step_cpu_seconds: list = field(default_factory=list)  # CPU time of the process (all threads)
    warmup_seconds: list = field(default_factory=list)
    units: str = ""  # tokens | pairs | steps
    units_per_step: float = 0.0
    peak_rss_mib: float | None = None
    alloc_peak_mib: float | None = None
    extra: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.step_seconds)

    def rate(self) -> float:
        return throughput(self.units_per_step, self.step_seconds) if self.ok else float("nan")

    def median_step(self) -> float:
        return statistics.median(self.step_seconds) if self.ok else float("nan")

    def cpu_per_wall(self) -> float:
        """CPU seconds per wall second in the timed steps: about the threads kept busy; far
        below the thread count means the process waited (other load, or stopped)."""
        if not self.ok or len(self.step_cpu_seconds) != len(self.step_seconds):
            return float("nan")
        return sum(self.step_cpu_seconds) / sum(self.step_seconds)

    def sampling(self) -> dict:
        """GRPO: completion tokens per step, sampling tokens/s and the share of step time."""
        tokens = self.extra.get("completion_tokens", [])
        seconds = self.extra.get("sampling_seconds", [])
        if not self.ok or not tokens or not seconds:
            return {}
        return {
            "completion_tokens_per_step": sum(tokens) / len(tokens),
            "sampling_tokens_per_s": sum(tokens) / sum(seconds),
            "sampling_share": sum(seconds) / sum(self.step_seconds),
        }

    def merge(self, other: Result) -> None:
        """Pool another repeat of the same measurement (--repeat)."""
        if not other.ok:
            note = f"a repeat {other.status}: {other.reason}"
            self.extra["note"] = "; ".join(filter(None, [self.extra.get("note"), note]))
            return
        if not self.ok:
            note = f"a repeat {self.status}: {self.reason}"
            self.__dict__.update(other.__dict__)
            self.extra["note"] = "; ".join(filter(None, [self.extra.get("note"), note]))
            return
        for name in ("step_seconds", "step_cpu_seconds", "warmup_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.steps += other.steps
        self.wall_seconds += other.wall_seconds
        self.peak_rss_mib = max(filter(None, [self.peak_rss_mib, other.peak_rss_mib]), default=None)
        self.alloc_peak_mib = max(
            filter(None, [self.alloc_peak_mib, other.alloc_peak_mib]), default=None
        )
        for key in ("completion_tokens", "sampling_seconds", "reference_seconds", "tokens"):
            if key in other.extra:
                self.extra[key] = self.extra.get(key, []) + other.extra[key]


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


def measure(args) -> dict:
    wall_start = time.perf_counter()
    load_before = load_average()
    plans = QUICK_PLANS if args.quick else PLANS
    plans = {
        key: replace(
            plan,
            steps=args.steps or plan.steps,
            grpo_steps=args.steps or plan.grpo_steps,
            warmup=plan.warmup if args.warmup is None else args.warmup,
        )
        for key, plan in plans.items()
    }
    jobs = selected_jobs(args)
    if not jobs:
        raise SystemExit("nothing selected: check --tasks, --tools and --models")
    frameworks = sorted({job[2] for job in jobs})

    def preload(framework: str) -> str:
        return args.mlx_preload if framework == "mlx" else ""

    keep = args.keep_temp
    root = tempfile.mkdtemp(prefix="mlxpost-bench-peers-")
    results: list[Result] = []
    calibration: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    data_info: dict[str, dict] = {}
    try:
        say(f"working in {root}")
        workdir = os.path.join(root, "work")
        os.makedirs(workdir, exist_ok=True)
        # Models and data are built in a subprocess too: a parent that imported torch and
        # built the 124M model would be over 1 GiB, and a forked worker's ru_maxrss starts
        # from its parent's resident set.
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
        paths, mlx_paths = prepared["paths"], prepared["mlx_paths"]
        configs, data_info = prepared["configs"], prepared["data"]
        for model in args.models:
            say(
                f"data for {model}: GRPO prompts of {data_info[model]['grpo_prompt_length']} "
                f"tokens; DPO pairs long enough (by row length): "
                f"{data_info[model]['dpo_pair_count']}"
            )
        for framework in frameworks:
            spec = {
                "task": "matmul",
                "model": "none",
                "tool": framework,
                "size": args.matmul_size,
                "torch_threads": args.torch_threads,
            }
            say(f"calibrating {framework}: float32 {args.matmul_size}^2 matmul")
            calibration[framework] = run_worker(spec, workdir, args.timeout, preload(framework))
            peak = calibration[framework].get("flops")
            say(f"  {framework}: {fmt(peak and peak / 1e9, '.1f')} GFLOP/s")

        pooled: dict[tuple, Result] = {}
        for repeat in range(args.repeat):  # round-robin, so slow spells of the machine spread
            for task, model, framework, tool in jobs:
                plan = plans[(model, framework)]
                spec = {
                    "task": task,
                    "model": model,
                    "framework": framework,
                    "tool": tool,
                    "repeat": repeat,
                    "model_dir": paths[model],
                    "mlx_lm_dir": mlx_paths.get(model),
                    "plan": asdict(plan),
                    "data": data_info[model],
                    "seed": args.seed,
                    "torch_threads": args.torch_threads,
                    "dpo_reference": "live" if framework == "mlx" else "precompute",
                }
                label = f"[{repeat + 1}/{args.repeat}] " if args.repeat > 1 else ""
                say(f"{label}{task:<4} {model:<9} {tool:<13} {plan.shape(task):<10} ...")
                raw = run_worker(spec, workdir, args.timeout, preload(framework))
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
                key = (task, model, tool)
                if key in pooled:
                    pooled[key].merge(result)
                else:
                    pooled[key] = result
                    results.append(result)
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    return {
        "results": results,
        "calibration": calibration,
        "configs": configs,
        "plans": {f"{m}/{fw}": asdict(p) for (m, fw), p in plans.items() if m in args.models},
        "data": {
            m: {k: d[k] for k in ("grpo_prompt_length", "dpo_pair_count")}
            for m, d in data_info.items()
        },
        "machine": machine_info(calibration, load_before, args),
        "versions": package_versions(),
        "wall_seconds": time.perf_counter() - wall_start,
    }


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


def sft_flops(configs: dict, result: Result) -> float | None:
    seq_len = int(result.shape.split("x")[1])
    try:
        return lora_train_flops_per_token(configs[result.model], seq_len, LORA_RANK)
    except (KeyError, ValueError):
        return None


def speed_vs_baseline(results: list[Result], result: Result) -> str:
    baseline = next(
        (
            r
            for r in results
            if r.task == result.task
            and r.model == result.model
            and r.tool == BASELINE[result.framework]
            and r.ok
        ),
        None,
    )
    if baseline is None or not result.ok:
        return "n/a"
    return f"{result.rate() / baseline.rate():.2f}x"


def status_note(result: Result) -> str:
    if result.ok:
        return result.extra.get("note", "")
    return f"{result.status}: {result.reason}"


def render(report: dict, command: str) -> str:
    results: list[Result] = report["results"]
    configs, calibration = report["configs"], report["calibration"]
    machine, versions = report["machine"], report["versions"]
    out = [
        "# mlxpost against its peers",
        "",
        "Generated by `scripts/bench_peers.py` (its docstring says exactly what is measured and how). "
        "Each tool runs in its own subprocess; only steps after the warmup are timed, in-process, "
        "by each tool's own step boundaries. Tools are compared within a framework; "
        "'vs mlxpost' is this tool's throughput over mlxpost's on the same work (below 1: slower).",
        "",
        f"Command: `{command}`",
        "",
        "## Machine and versions",
        "",
        markdown_table(
            ["item", "value"],
            [[k, str(v)] for k, v in machine.items()]
            + [[f"version: {k}", v] for k, v in versions.items()],
        ),
        "",
        "Other processes competing for the CPUs (see the load average) slow every figure, "
        "torch's multi-threaded kernels most. 'CPU/wall' is the worker's CPU seconds (all "
        "threads) per wall second in the timed steps: near the thread count on a quiet machine, "
        "far below it when the worker waited for the CPU. `--json` keeps every step's time.",
        "",
    ]
    ok_cal = {fw: c for fw, c in calibration.items() if c.get("flops")}
    if ok_cal:
        out += [
            "## Peak matmul throughput",
            "",
            markdown_table(
                ["framework", "matmul", "best GFLOP/s", "median GFLOP/s"],
                [
                    [
                        fw,
                        f"float32 {c['size']}x{c['size']} @ {c['size']}x{c['size']}",
                        fmt(c["flops"] / 1e9, ".1f"),
                        fmt(c["median_flops"] / 1e9, ".1f"),
                    ]
                    for fw, c in ok_cal.items()
                ],
                right={2, 3},
            ),
            "",
        ]
    for fw, c in calibration.items():
        if not c.get("flops"):
            out += [f"Matmul calibration for {fw}: {c.get('status')}: {c.get('reason')}", ""]

    sft = [r for r in results if r.task == "sft"]
    if sft:
        rows = []
        for r in sft:
            flops = sft_flops(configs, r)
            peak = calibration.get(r.framework, {}).get("flops")
            achieved = r.rate() * flops if (r.ok and flops) else None
            rows.append(
                [
                    r.model,
                    r.framework,
                    r.tool,
                    r.shape,
                    f"{r.warmup}+{r.steps}",
                    fmt(r.median_step(), ".3f"),
                    fmt(r.rate(), ",.0f"),
                    speed_vs_baseline(results, r),
                    fmt(achieved and achieved / 1e9, ".2f"),
                    fmt(achieved and peak and 100 * achieved / peak, ".1f"),
                    fmt(r.cpu_per_wall(), ".2f"),
                    fmt(r.peak_rss_mib, ",.0f"),
                    fmt(r.alloc_peak_mib, ",.0f"),
                    status_note(r),
                ]
            )
        out += [
            "## LoRA SFT",
            "",
            "Tokens = batch x seq_len input tokens per step (rows of real tokens, no padding). "
            "Model GFLOP/s = FLOPs/token x tokens/s with FLOPs/token = 4 N + 6 N_lora + "
            "12 n_layer d_model seq_len; MFU = that over the framework's best matmul GFLOP/s.",
            "",
            markdown_table(
                [
                    "model",
                    "framework",
                    "tool",
                    "batch x len",
                    "warmup+timed",
                    "s/step",
                    "tokens/s",
                    "vs mlxpost",
                    "model GFLOP/s",
                    "MFU %",
                    "CPU/wall",
                    "peak RSS MiB",
                    "allocator peak MiB",
                    "note",
                ],
                rows,
                right={5, 6, 7, 8, 9, 10, 11, 12},
            ),
            "",
        ]
        flop_rows = []
        for model, config in configs.items():
            try:
                n, n_lora = matmul_params(config), lora_params(config, LORA_RANK)
            except ValueError:
                continue
            seq_lens = sorted({int(r.shape.split("x")[1]) for r in sft if r.model == model})
            for seq_len in seq_lens:
                flop_rows.append(
                    [
                        model,
                        f"{n:,}",
                        f"{n_lora:,}",
                        str(seq_len),
                        fmt(lora_train_flops_per_token(config, seq_len, LORA_RANK) / 1e6, ",.2f"),
                    ]
                )
        if flop_rows:
            out += [
                markdown_table(
                    ["model", "N (matmul weights)", "N_lora", "seq_len", "MFLOPs/token"],
                    flop_rows,
                    right={1, 2, 3, 4},
                ),
                "",
            ]

    grpo = [r for r in results if r.task == "grpo"]
    if grpo:
        rows = []
        for r in grpo:
            e = r.sampling()
            rows.append(
                [
                    r.model,
                    r.framework,
                    r.tool,
                    r.shape,
                    f"{r.warmup}+{r.steps}",
                    fmt(r.median_step(), ".2f"),
                    fmt(1.0 / r.rate() if r.ok else None, ".2f"),
                    speed_vs_baseline(results, r),
                    fmt(e.get("completion_tokens_per_step"), ".0f"),
                    fmt(e.get("sampling_tokens_per_s"), ",.0f"),
                    fmt(e.get("sampling_share") and 100 * e["sampling_share"], ".0f"),
                    fmt(r.cpu_per_wall(), ".2f"),
                    fmt(r.peak_rss_mib, ",.0f"),
                    fmt(r.alloc_peak_mib, ",.0f"),
                    status_note(r),
                ]
            )
        out += [
            "## GRPO",
            "",
            "Shape: prompts x samples per prompt x new tokens (exactly, EOS-free), prompts of equal "
            "length. s/step (mean) = timed seconds / timed steps; 'vs mlxpost' compares steps/s. "
            "Sampling tokens/s = completion tokens / seconds in the sampler, prefill included; "
            "'% sampling' = the share of the step spent sampling.",
            "",
            markdown_table(
                [
                    "model",
                    "framework",
                    "tool",
                    "P x G x new",
                    "warmup+timed",
                    "s/step (median)",
                    "s/step (mean)",
                    "vs mlxpost",
                    "completion tokens/step",
                    "sampling tokens/s",
                    "% sampling",
                    "CPU/wall",
                    "peak RSS MiB",
                    "allocator peak MiB",
                    "note",
                ],
                rows,
                right={5, 6, 7, 8, 9, 10, 11, 12, 13},
            ),
            "",
        ]

    dpo = [r for r in results if r.task == "dpo"]
    if dpo:
        rows = [
            [
                r.model,
                r.framework,
                r.tool,
                r.shape,
                r.extra.get("reference", "live" if r.framework == "mlx" else "precompute"),
                f"{r.warmup}+{r.steps}",
                fmt(r.median_step(), ".3f"),
                fmt(r.rate(), ".2f"),
                speed_vs_baseline(results, r),
                fmt(np.mean(r.extra["tokens"]) if r.extra.get("tokens") else None, ".0f"),
                fmt(r.cpu_per_wall(), ".2f"),
                fmt(r.peak_rss_mib, ",.0f"),
                fmt(r.alloc_peak_mib, ",.0f"),
                status_note(r),
            ]
            for r in dpo
        ]
        out += [
            "## DPO",
            "",
            "Shape: pairs per step x tokens per row (prompt + completion truncated to exactly that "
            "length; each pair is a chosen and a rejected row). Reference logprobs: precomputed "
            "before training (untimed) or computed live in every step.",
            "",
            markdown_table(
                [
                    "model",
                    "framework",
                    "tool",
                    "pairs x len",
                    "reference",
                    "warmup+timed",
                    "s/step",
                    "pairs/s",
                    "vs mlxpost",
                    "tokens/step",
                    "CPU/wall",
                    "peak RSS MiB",
                    "allocator peak MiB",
                    "note",
                ],
                rows,
                right={6, 7, 8, 9, 10, 11, 12},
            ),
            "",
        ]

    unavailable = [r for r in results if not r.ok]
    if unavailable:
        out += ["## Rows that did not run", ""]
        out += [f"- {r.task} / {r.model} / {r.tool}: {r.status}: {r.reason}" for r in unavailable]
        out += [""]

    out += [
        "## Plans",
        "",
        markdown_table(
            [
                "model/framework",
                "SFT batch x len",
                "GRPO P x G x new",
                "DPO pairs x len",
                "warmup",
                "timed steps (GRPO)",
            ],
            [
                [
                    key,
                    f"{p['sft_batch']}x{p['sft_seq_len']}",
                    f"{p['grpo_prompts']}x{p['grpo_generations']}x{p['grpo_new_tokens']}",
                    f"{p['dpo_pairs']}x{p['dpo_length']}",
                    str(p["warmup"]),
                    f"{p['steps']} ({p['grpo_steps']})",
                ]
                for key, p in report["plans"].items()
            ],
        ),
        "",
        "## Reproduce",
        "",
        "```",
        "pip install -c constraints/linux-cpu.txt -e '.[bench]'   # CPU-only Linux",
        command,
        "```",
        "",
        f"Whole run: {report['wall_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(out)


def print_summary(report: dict) -> None:
    for r in report["results"]:
        rate = fmt(r.rate(), ",.2f")
        print(
            f"{r.task:<4} {r.model:<9} {r.framework:<5} {r.tool:<13} {r.shape:<9} "
            f"{rate:>10} {r.units or '':<6}/s  {speed_vs_baseline(report['results'], r):>6}  "
            f"rss {fmt(r.peak_rss_mib, ',.0f')} MiB  {status_note(r)}"
        )


def to_json(report: dict) -> dict:
    payload = dict(report)
    payload["results"] = []
    for r in report["results"]:
        row = asdict(r)
        row["rate"] = r.rate() if r.ok else None
        row["median_step_seconds"] = r.median_step() if r.ok else None
        if r.task == "sft" and r.ok:
            flops = sft_flops(report["configs"], r)
            peak = report["calibration"].get(r.framework, {}).get("flops")
            if flops:
                row["flops_per_token"] = flops
                row["model_flops_per_s"] = r.rate() * flops
                row["mfu"] = mfu(r.rate(), flops, peak) if peak else None
        payload["results"].append(row)
    return payload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma separated: sft,grpo,dpo")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help=f"comma separated: {','.join(TOOLS)}"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma separated: tiny,gpt2-124m (default: both; --quick: tiny)",
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps for every row (0: the plan's)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: the plan's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--matmul-size", type=int, default=1024, help="square matmul for the peak FLOP/s"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads(N) in torch workers (0: default)",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole job list N times round-robin and pool the timed steps",
    )
    parser.add_argument(
        "--mlx-preload",
        default="",
        metavar="LIB",
        help="LD_PRELOAD for MLX workers, e.g. Debian's OpenBLAS "
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 (the MLX Linux wheel's own "
        "BLAS is a slow reference one)",
    )
    parser.add_argument(
        "--markdown",
        default=os.path.join(ROOT, "docs", "bench_peers.md"),
        help="markdown report path ('' to skip)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--keep-temp", action="store_true", help="keep models, data and logs")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    default_models = "tiny" if args.quick else ",".join(MODELS)
    args.models = [m.strip() for m in (args.models or default_models).split(",") if m.strip()]
    for name, given, known in (
        ("tasks", args.tasks, TASKS),
        ("tools", args.tools, tuple(TOOLS)),
        ("models", args.models, MODELS),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {', '.join(known)}")
    if args.steps < 0 or (args.warmup is not None and args.warmup < 0):
        parser.error("--steps and --warmup must be at least 0")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.mlx_preload and not os.path.isfile(args.mlx_preload):
        parser.error(f"--mlx-preload {args.mlx_preload}: no such file")
    return args


def command_line(argv: list[str]) -> str:
    script = os.path.relpath(SCRIPT, ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [script, *argv])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    report = measure(args)
    command = command_line(argv)
    print_summary(report)
    markdown = render(report, command)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown)
        print(f"wrote {args.markdown}")
    else:
        print(markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(report), f, indent=2, default=str)
        print(f"wrote {args.json}")
    print(f"wall time: {report['wall_seconds']:.0f} s")


# ---- the workers: one measurement per subprocess ----


class PeerUnavailable(Exception):
    """A peer that cannot be imported or cannot run here: reported, not a crash."""


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


def import_peer(module: str, package: str):
    import importlib

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


def torch_alloc_peak_mib(torch) -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None  # torch on CPU keeps no allocator peak


def mlx_alloc_peak_mib() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 2**20


def sft_rows(spec: dict) -> np.ndarray:
    """Every row the run trains on: batch x (warmup + steps) rows of seq_len tokens."""
    plan = spec["plan"]
    count = plan["sft_batch"] * (plan["warmup"] + plan["steps"])
    stream = np.load(spec["data"]["sft_stream"])
    return split_rows(stream, plan["sft_seq_len"], count)


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


# -- models and data --


def worker_prepare(spec: dict) -> dict:
    root = spec["root"]
    paths = build_models(spec["models"], os.path.join(root, "models"), spec["seed"])
    configs, mlx_paths, data = {}, {}, {}
    for model in spec["models"]:
        with open(os.path.join(paths[model], "config.json")) as f:
            configs[model] = json.load(f)
        if model in spec["mlx_lm_models"]:
            mlx_paths[model] = convert_for_mlx_lm(
                paths[model], os.path.join(root, "models", f"{model}-mlx-lm")
            )
        plans = [Plan(**p) for p in spec["plans"][model]]
        data[model] = build_data(paths[model], os.path.join(root, "data", model), plans)
    return {
        "status": "ok",
        "paths": paths,
        "mlx_paths": mlx_paths,
        "configs": configs,
        "data": data,
    }


# -- calibration --


def worker_matmul(spec: dict) -> dict:
    n, reps = int(spec["size"]), 10
    flops = 2.0 * n**3
    times = []
    if spec["tool"] == "torch":
        torch = torch_setup(spec)
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm up
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        info = {
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        }
    else:
        import mlx.core as mx

        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b, a @ b)
        reps = 4
        for _ in range(reps):
            start = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - start)
        info = {"device": str(mx.default_device())}
    return {
        "status": "ok",
        "size": n,
        "seconds": times,
        "flops": flops / min(times),
        "median_flops": flops / statistics.median(times),
        **info,
    }


# -- SFT --


def worker_sft_mlxpost(spec: dict) -> dict:
    from functools import partial

    from mlxpost.algorithms.supervised import nll_and_kl_loss, split_microbatches
    from mlxpost.backend import LoraConfig, OptimConfig, get_backend
    from mlxpost.functional import prediction_mask
    from mlxpost.tokenizer import load_tokenizer

    plan, seed = spec["plan"], spec["seed"]
    backend = get_backend(spec["framework"])
    if spec["framework"] == "torch":
        torch = torch_setup(spec)
    backend.seed(seed)
    load_tokenizer(spec["model_dir"])  # as `mlxpost sft` does (and every peer), for the memory
    model = backend.load_model(spec["model_dir"], "float32")
    backend.attach_lora(model, LoraConfig(LORA_RANK, LORA_ALPHA, 0.0, LORA_TARGETS), seed=seed)
    total = plan["warmup"] + plan["steps"]
    optimizer = backend.make_optimizer(
        model, OptimConfig(learning_rate=LEARNING_RATE, warmup_steps=0, total_steps=total)
    )
    loss_fn = partial(nll_and_kl_loss, kl_beta=0.0)  # what `mlxpost sft` trains with
    rows = sft_rows(spec)
    batch_size = plan["sft_batch"]
    steps = Steps()
    for step in range(total):
        ids = rows[step * batch_size : (step + 1) * batch_size].astype(np.int32)
        mask = np.ones_like(ids)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "loss_mask": prediction_mask(mask).astype(np.float32),
        }
        steps.begin()
        parts, weights = split_microbatches(batch, 1)
        backend.seed(seed + step)
        metrics = backend.train_step(model, optimizer, loss_fn, parts, weights)  # host floats
        steps.end()
    trainable, total_params = backend.parameter_count(model)
    return {
        "status": "ok",
        "units": "tokens",
        "units_per_step": float(ids.size),
        **steps.fields(plan["warmup"]),
        "alloc_peak_mib": torch_alloc_peak_mib(torch)
        if spec["framework"] == "torch"
        else mlx_alloc_peak_mib(),
        "extra": {
            "final_loss": float(metrics["loss"]),
            "trainable_params": int(trainable),
            "total_params": int(total_params),
        },
    }


def trl_common_args(spec: dict, output_dir: str, total_steps: int) -> dict:
    """TrainingArguments shared by the TRL trainers: float32, no checkpointing, no logging."""
    import torch

    return dict(
        output_dir=output_dir,
        max_steps=total_steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )


def trl_model_and_tokenizer(spec: dict):
    """The checkpoint in float32 with its dropouts off (mlxpost trains in eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=torch.float32,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    return model, tokenizer


def peft_lora_config():
    peft = import_peer("peft", "peft")
    return peft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )


def step_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps = Steps()

        def on_step_begin(self, args, state, control, **kwargs):
            self.steps.begin()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.end()

    return StepTimer()


def worker_sft_trl(spec: dict) -> dict:
    trl = import_peer("trl", "trl")
    torch = torch_setup(spec)
    from datasets import Dataset

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    model, tokenizer = trl_model_and_tokenizer(spec)
    rows = sft_rows(spec)
    dataset = Dataset.from_dict({"input_ids": rows.astype(np.int64).tolist()})
    config = trl.SFTConfig(
        **trl_common_args(spec, os.path.join(os.getcwd(), "trl-sft"), total),
        per_device_train_batch_size=plan["sft_batch"],
        max_length=plan["sft_seq_len"],
        packing=False,
        padding_free=False,
    )
    timer = step_timer_callback()
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(),
        callbacks=[timer],
    )
    trainer.train()
    counted = getattr(trainer, "_total_train_tokens", None)  # TRL's own attention-mask count
    tokens_per_step = plan["sft_batch"] * plan["sft_seq_len"]
    note = ""
    if counted is not None and counted != tokens_per_step * total:
        note = f"TRL counted {counted} tokens, expected {tokens_per_step * total}"
    return {
        "status": "ok",
        "units": "tokens",
        "units_per_step": float(tokens_per_step),
        **timer.steps.fields(plan["warmup"]),
        "alloc_peak_mib": torch_alloc_peak_mib(torch),
        "extra": {"trl_counted_tokens": counted, "note": note},
    }


def mlx_lm_model(spec: dict):
    """mlx-lm's GPT-2 with its LoRA layers on every projection (scale = alpha / rank)."""
    import_peer("mlx_lm", "mlx-lm")
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    mx.random.seed(spec["seed"])
    model, tokenizer = load(spec["mlx_lm_dir"])
    model.freeze()
    linear_to_lora_layers(
        model,
        len(model.layers),
        {
            "rank": LORA_RANK,
            "scale": LORA_ALPHA / LORA_RANK,
            "dropout": 0.0,
            "keys": list(MLX_LM_LORA_KEYS),
        },
    )
    return model, tokenizer


def mlx_report_callback():
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Reports(TrainingCallback):
        """steps_per_report=1: each report is one step, timed by the trainer itself."""

        def __init__(self):
            self.reports: list[dict] = []
            self.steps = Steps()

        def on_train_loss_report(self, train_info: dict):
            self.reports.append(dict(train_info))
            self.steps.add(1.0 / train_info["iterations_per_second"])

    return Reports()


def worker_sft_mlx_lm(spec: dict) -> dict:
    import_peer("mlx_lm", "mlx-lm")
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    model, _ = mlx_lm_model(spec)
    rows = sft_rows(spec)
    dataset = [(row.tolist(), 0) for row in rows]  # (tokens, offset): loss on every token
    args = TrainingArgs(
        batch_size=plan["sft_batch"],
        iters=total,
        val_batches=0,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=plan["sft_seq_len"] + 1,
        adapter_file=os.path.join(os.getcwd(), "mlx-lm-adapters.safetensors"),
    )
    callback = mlx_report_callback()
    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0)
    train(model, optimizer, dataset, None, args=args, training_callback=callback)
    return {
        "status": "ok",
        "units": "tokens",
        "units_per_step": float(plan["sft_batch"] * plan["sft_seq_len"]),
        **callback.steps.fields(plan["warmup"]),
        "alloc_peak_mib": mlx_alloc_peak_mib(),
        "extra": {"final_loss": callback.reports[-1]["train_loss"] if callback.reports else None},
    }


# -- GRPO --


def mlxpost_session(command: str, config):
    from mlxpost.loop import setup

    return setup(command, config)


def worker_grpo_mlxpost(spec: dict) -> dict:
    from mlxpost.algorithms.grpo import GRPO, GRPOConfig

    plan, seed = spec["plan"], spec["seed"]
    if spec["framework"] == "torch":
        torch = torch_setup(spec)
    total = plan["warmup"] + plan["grpo_steps"]
    config = GRPOConfig(
        backend=spec["framework"],
        model=spec["model_dir"],
        data=spec["data"]["grpo_prompts"],
        output=os.path.join(os.getcwd(), "mlxpost-grpo"),
        steps=total,
        batch_size=plan["grpo_prompts"],
        num_generations=plan["grpo_generations"],
        max_new_tokens=plan["grpo_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        rewards=f"{reward_file()}:bench_reward",
        kl_beta=0.0,
        log_kl=False,  # no reference forward: TRL and mlx-lm-lora skip it at KL weight 0
        aggregation="grpo",
        advantage="group",
        learning_rate=LEARNING_RATE,
        warmup_steps=0,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        eval_math=0,
        eval_every=0,
        save_every=0,
        seed=seed,
    )
    session = mlxpost_session("grpo", config)
    session.info.eos_ids = [NEVER_EOS]  # EOS-free: every sample has exactly max_new_tokens
    algorithm = GRPO(session, config)
    sampler = algorithm.rollouts.sample
    sampled: list[tuple[float, int]] = []

    def timed_sample(step):
        start = time.perf_counter()
        batch = sampler(step)
        sampled.append((time.perf_counter() - start, int(batch.samples.completion_mask.sum())))
        return batch

    algorithm.rollouts.sample = timed_sample
    reference = algorithm.rollouts.reference_logprobs
    reference_seconds: list[float] = []

    def timed_reference(batch):
        start = time.perf_counter()
        out = reference(batch)
        reference_seconds.append(time.perf_counter() - start)
        return out

    algorithm.rollouts.reference_logprobs = timed_reference
    steps = Steps()
    for step in range(total):
        steps.begin()
        metrics = algorithm.train_step(step)
        steps.end()
    warmup = plan["warmup"]
    share = sum(reference_seconds[warmup:]) / max(sum(steps.wall[warmup:]), 1e-9)
    extra = {
        "final_loss": float(metrics["loss"]),
        "reference_seconds": reference_seconds[warmup:],
        "note": f"reference logprobs (only logged: KL weight 0) take {100 * share:.0f}% of a step"
        if reference_seconds
        else "",
    }
    torch_module = torch if spec["framework"] == "torch" else None
    return grpo_result(spec, steps, sampled, torch_module, extra)


def grpo_result(spec, steps: Steps, sampled, torch, extra) -> dict:
    """sampled: (seconds, completion tokens) of each step's sampling call."""
    plan = spec["plan"]
    warmup = plan["warmup"]
    timed = sampled[warmup:]
    extra = dict(extra)
    extra["sampling_seconds"] = [s for s, _ in timed]
    extra["completion_tokens"] = [n for _, n in timed]
    expected = plan["grpo_prompts"] * plan["grpo_generations"] * plan["grpo_new_tokens"]
    odd = sorted({n for _, n in timed if n != expected})
    if odd:
        note = f"generated {odd} tokens in some steps, not {expected}"
        extra["note"] = "; ".join(filter(None, [extra.get("note"), note]))
    return {
        "status": "ok",
        "units": "steps",
        "units_per_step": 1.0,
        **steps.fields(warmup),
        "alloc_peak_mib": torch_alloc_peak_mib(torch)
        if torch is not None
        else mlx_alloc_peak_mib(),
        "extra": extra,
    }


def reward_file() -> str:
    """bench_reward alone in a file, for mlxpost's `file.py:function` reward loader."""
    import inspect

    path = os.path.join(os.getcwd(), "bench_reward.py")
    with open(path, "w") as f:
        f.write(inspect.getsource(bench_reward))
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def worker_grpo_trl(spec: dict) -> dict:
    trl = import_peer("trl", "trl")
    torch = torch_setup(spec)
    from datasets import Dataset

    plan = spec["plan"]
    total = plan["warmup"] + plan["grpo_steps"]
    model, tokenizer = trl_model_and_tokenizer(spec)
    prompts = read_jsonl(spec["data"]["grpo_prompts"])
    dataset = Dataset.from_list([{"prompt": ex["prompt"]} for ex in prompts])
    new_tokens = plan["grpo_new_tokens"]
    config = trl.GRPOConfig(
        **trl_common_args(spec, os.path.join(os.getcwd(), "trl-grpo"), total),
        per_device_train_batch_size=plan["grpo_prompts"] * plan["grpo_generations"],
        num_generations=plan["grpo_generations"],
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},  # EOS-free: exactly new_tokens
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        disable_dropout=True,
        log_completions=False,
    )
    timer = step_timer_callback()

    def reward(prompts, completions, **kwargs):
        return bench_reward(prompts, completions)

    reward.__name__ = "bench_reward"
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(),
        callbacks=[timer],
    )
    generate = trainer._generate_single_turn
    sampled: list[tuple[float, int]] = []
    prompt_lengths: set[int] = set()

    def timed_generate(prompt_ids, *args, **kwargs):
        start = time.perf_counter()
        out = generate(prompt_ids, *args, **kwargs)
        completion_ids = out[0]
        sampled.append((time.perf_counter() - start, sum(len(c) for c in completion_ids)))
        prompt_lengths.update(len(p) for p in prompt_ids)
        return out

    trainer._generate_single_turn = timed_generate
    trainer.train()
    extra = {"prompt_lengths": sorted(prompt_lengths)}
    expected_prompt = spec["data"]["grpo_prompt_length"]
    if prompt_lengths and prompt_lengths != {expected_prompt}:
        extra["note"] = (
            f"TRL prompts of {sorted(prompt_lengths)} tokens (others: {expected_prompt})"
        )
    return grpo_result(spec, timer.steps, sampled, torch, extra)


def worker_grpo_mlx_lm_lora(spec: dict) -> dict:
    grpo_module = import_peer("mlx_lm_lora.trainer.grpo_trainer", "mlx-lm-lora")
    import mlx.optimizers as optim

    plan = spec["plan"]
    total = plan["warmup"] + plan["grpo_steps"]
    model, tokenizer = mlx_lm_model(spec)
    tokenizer.eos_token_ids = []  # EOS-free: every sample has exactly max_completion_length
    prompts = read_jsonl(spec["data"]["grpo_prompts"])
    dataset = []
    for ex in prompts:
        text = tokenizer.apply_chat_template(
            ex["prompt"], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        answer = str(ex.get("answer", ""))
        dataset.append((ids, tokenizer.encode(answer, add_special_tokens=False), text, answer))
    lengths = {len(d[0]) for d in dataset}
    args = grpo_module.GRPOTrainingArgs(
        batch_size=plan["grpo_prompts"],
        iters=total,
        val_batches=0,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=4096,
        adapter_file=os.path.join(os.getcwd(), "mlx-lm-lora-grpo.safetensors"),
        group_size=plan["grpo_generations"],
        beta=0.0,
        epsilon=0.2,
        max_completion_length=plan["grpo_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        grpo_loss_type="grpo",
    )
    generate = grpo_module.generate_grpo
    sampled: list[tuple[float, int]] = []

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        completions, texts, indices = generate(*a, **kw)
        sampled.append((time.perf_counter() - start, sum(int(c.size) for c in completions)))
        return completions, texts, indices

    grpo_module.generate_grpo = timed_generate

    def reward(prompts, completions, answer, types=None):
        return bench_reward(prompts, completions)

    reward.__name__ = "bench_reward"
    callback = mlx_report_callback()
    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0)
    grpo_module.train_grpo(
        model=model,
        ref_model=None,
        tokenizer=tokenizer,
        optimizer=optimizer,
        train_dataset=dataset,
        val_dataset=None,
        reward_funcs=[reward],
        args=args,
        training_callback=callback,
        end_answer_token="",
    )
    extra = {"prompt_lengths": sorted(lengths)}
    return grpo_result(spec, callback.steps, sampled, None, extra)


# -- DPO --


def worker_dpo_mlxpost(spec: dict) -> dict:
    from mlxpost.algorithms.dpo import DPO, DPOConfig

    plan, seed = spec["plan"], spec["seed"]
    if spec["framework"] == "torch":
        torch = torch_setup(spec)
    total = plan["warmup"] + plan["steps"]
    reference = spec["dpo_reference"]
    config = DPOConfig(
        backend=spec["framework"],
        model=spec["model_dir"],
        data=write_pairs(spec, plan["dpo_pairs"] * total),
        output=os.path.join(os.getcwd(), "mlxpost-dpo"),
        steps=total,
        batch_size=plan["dpo_pairs"],
        max_length=plan["dpo_length"],
        on_too_long="truncate",
        loss="sigmoid",
        beta=DPO_BETA,
        reference_mode=reference,
        learning_rate=LEARNING_RATE,
        warmup_steps=0,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        eval_every=0,
        save_every=0,
        seed=seed,
    )
    session = mlxpost_session("dpo", config)
    algorithm = DPO(session, config)
    steps, tokens = Steps(), []
    for step in range(total):
        steps.begin()
        metrics = algorithm.train_step(step)
        steps.end()
        tokens.append(metrics.get("tokens", 0.0))
    return {
        "status": "ok",
        "units": "pairs",
        "units_per_step": float(plan["dpo_pairs"]),
        **steps.fields(plan["warmup"]),
        "alloc_peak_mib": torch_alloc_peak_mib(torch)
        if spec["framework"] == "torch"
        else mlx_alloc_peak_mib(),
        "extra": {
            "reference": reference,
            "tokens": tokens[plan["warmup"] :],
            "final_loss": float(metrics["loss"]),
        },
    }


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


def worker_dpo_trl(spec: dict) -> dict:
    trl = import_peer("trl", "trl")
    torch = torch_setup(spec)
    from datasets import Dataset

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    model, tokenizer = trl_model_and_tokenizer(spec)
    pairs = read_jsonl(write_pairs(spec, plan["dpo_pairs"] * total))
    dataset = Dataset.from_list(pairs)
    precompute = spec["dpo_reference"] == "precompute"
    config = trl.DPOConfig(
        **trl_common_args(spec, os.path.join(os.getcwd(), "trl-dpo"), total),
        per_device_train_batch_size=plan["dpo_pairs"],
        max_length=plan["dpo_length"],
        truncation_mode="keep_start",
        loss_type=["sigmoid"],
        beta=DPO_BETA,
        precompute_ref_log_probs=precompute,
        disable_dropout=True,
    )
    timer = step_timer_callback()
    trainer = trl.DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(),
        callbacks=[timer],
    )
    widths: list[int] = []
    compute_loss = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):
        widths.append(int(inputs["attention_mask"].sum()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_loss
    trainer.train()
    return {
        "status": "ok",
        "units": "pairs",
        "units_per_step": float(plan["dpo_pairs"]),
        **timer.steps.fields(plan["warmup"]),
        "alloc_peak_mib": torch_alloc_peak_mib(torch),
        "extra": {
            "reference": spec["dpo_reference"],
            "tokens": widths[plan["warmup"] :],
        },
    }


def worker_dpo_mlx_lm_lora(spec: dict) -> dict:
    dpo_module = import_peer("mlx_lm_lora.trainer.dpo_trainer", "mlx-lm-lora")
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.utils import load

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    note = ""
    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        # train_dpo calls mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]),
        # a Metal-only figure mlx's CPU device does not report; the wired limit does not change
        # the computation, so the bench answers with the machine's memory.
        real_info = mx.device_info
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

        def device_info():
            return {**real_info(), "max_recommended_working_set_size": memory}

        mx.device_info = device_info
        note = "mx.device_info() shimmed (mlx-lm-lora's DPO reads a Metal-only key)"
    model, tokenizer = mlx_lm_model(spec)
    reference, _ = load(spec["mlx_lm_dir"])  # as mlx-lm-lora's CLI: a second copy, frozen
    reference.freeze()
    pairs = read_jsonl(write_pairs(spec, plan["dpo_pairs"] * total))

    def encode(messages, generation_prompt=False):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer.encode(text, add_special_tokens=False)

    dataset = []
    for pair in pairs:
        prompt_len = len(encode(pair["prompt"], True))
        dataset.append(
            {
                "chosen": encode(pair["prompt"] + pair["chosen"]),
                "rejected": encode(pair["prompt"] + pair["rejected"]),
                "chosen_prompt_length": prompt_len,
                "rejected_prompt_length": prompt_len,
            }
        )
    args = dpo_module.DPOTrainingArgs(
        batch_size=plan["dpo_pairs"],
        iters=total,
        val_batches=0,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        # its scorer feeds tokens[:-1]: one more token keeps `length` tokens per row in the forward
        max_seq_length=plan["dpo_length"] + 1,
        adapter_file=os.path.join(os.getcwd(), "mlx-lm-lora-dpo.safetensors"),
        beta=DPO_BETA,
        loss_type="sigmoid",
    )
    callback = mlx_report_callback()
    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0)
    dpo_module.train_dpo(
        model=model,
        ref_model=reference,
        optimizer=optimizer,
        train_dataset=dataset,
        val_dataset=None,
        args=args,
        training_callback=callback,
        loss_type="sigmoid",
    )
    return {
        "status": "ok",
        "units": "pairs",
        "units_per_step": float(plan["dpo_pairs"]),
        **callback.steps.fields(plan["warmup"]),
        "alloc_peak_mib": mlx_alloc_peak_mib(),
        "extra": {
            "reference": "live",
            # rows cut to max_seq_length = length + 1, of which its scorer feeds `length`
            "tokens": [float(2 * plan["dpo_pairs"] * plan["dpo_length"])] * plan["steps"],
            "note": note,
        },
    }


WORKERS = {
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


if __name__ == "__main__":
    main()
