"""The training commands. Each maps its config dataclass to options one to one."""

from __future__ import annotations

import json

import click

from mlxpost.algorithms.distill import DistillConfig
from mlxpost.algorithms.grpo import GRPOConfig
from mlxpost.algorithms.ppo import PPOConfig
from mlxpost.algorithms.preference import DPOConfig
from mlxpost.algorithms.rm import RMConfig
from mlxpost.algorithms.sft import SFTConfig
from mlxpost.config import cli_options, resolve
from mlxpost.distributed import is_main_process
from mlxpost.run import json_safe


def run(
    command: str,
    config_cls,
    algorithm: str,
    ctx,
    values: dict,
    config_file,
    scalar_head: bool = False,
) -> None:
    """Resolve the config, set up, train, and print the final figures as one JSON object
    on stdout (progress goes to stderr). `algorithm` is "module:Class" under
    mlxpost.algorithms, or a function of the config naming one; imported only now so
    --help stays fast."""
    import importlib

    from mlxpost.loop import setup, train

    cfg = resolve(config_cls, ctx, values, config_file, command)
    if callable(algorithm):
        algorithm = algorithm(cfg)
    module, name = algorithm.split(":")
    algorithm_cls = getattr(importlib.import_module(f"mlxpost.algorithms.{module}"), name)
    session = setup(command, cfg, scalar_head=scalar_head)
    summary = train(session, algorithm_cls(session, cfg))
    if is_main_process():  # one JSON object from a data-parallel run: rank 0's
        click.echo(json.dumps(json_safe(summary), indent=2))


@click.command()
@cli_options(SFTConfig)
@click.pass_context
def sft(ctx, config_file, **values):
    """Supervised fine-tuning (LoRA or full), optionally with a KL penalty to the base.

    \b
    Default model: the bundled tiny GPT-2; default data: the bundled GSM8K-style
    math train split (held-out: its test split). Data may be conversational
    (messages / ShareGPT), prompt-completion, Alpaca, GSM8K or plain text.
    The run directory gets config.yaml, metrics.jsonl, checkpoints/, final/
    and summary.json; --resume continues the newest checkpoint.
    """
    run("sft", SFTConfig, "sft:SFT", ctx, values, config_file)


@click.command()
@cli_options(DistillConfig)
@click.pass_context
def distill(ctx, config_file, **values):
    """Reasoning distillation: SFT on <think> traces, or logit distillation from --teacher.

    \b
    Default data: the bundled reasoning traces (conversational, <think>...</think>
    before the answer). With --teacher (same tokenizer) the student matches the
    teacher's distributions: --divergence forward_kl | reverse_kl | jsd
    (--jsd-beta), optionally plus --sft-weight times the data's NLL. Evaluations
    report math accuracy and reasoning length (think share, words, steps).
    """
    run("distill", DistillConfig, "distill:Distill", ctx, values, config_file)


@click.command()
@cli_options(GRPOConfig)
@click.pass_context
def grpo(ctx, config_file, **values):
    """GRPO and its variants (DAPO clip-higher, GSPO, Dr. GRPO, rank advantages).

    \b
    Default model: the bundled tiny GPT-2; default data: the bundled math RL
    prompts (prompt + answer); default rewards: math correctness + answer format.
    Each step samples --num-generations completions per prompt (one shared
    prefill), turns rewards into group-relative advantages and takes
    --ppo-epochs clipped policy-gradient passes. Held-out math accuracy is
    measured every --eval-every steps. User rewards: --rewards my_module:fn
    (batched: prompts, completions, dataset columns -> list of floats).
    """
    run("grpo", GRPOConfig, "grpo:GRPO", ctx, values, config_file)


@click.command()
@cli_options(PPOConfig)
@click.pass_context
def ppo(ctx, config_file, **values):
    """PPO with a critic and GAE (InstructGPT-style RLHF).

    \b
    Reward: the --rewards functions (default: math correctness + format) plus
    --reward-model DIR (from `mlxpost rm`, scored at the last token, its scores
    normalised by their running mean and std; alone unless --rewards is given),
    with optional --reward-clip, --missing-eos-penalty and --length-penalty; a
    per-token KL penalty to the base (adapter off), fixed (--kl-beta) or
    adaptive (--kl-target). The critic is a separate LoRA and value head
    (--critic separate, the default), initialised from the reward model
    (reward_model) or a head on the policy's trunk (shared).
    GAE(--gamma, --lam), whitened advantages, clipped policy and value losses,
    --ppo-epochs over --minibatches, early stop at 1.5 x --target-kl. Logs
    value loss, explained variance and the KL coefficient.
    """
    run("ppo", PPOConfig, "ppo:PPO", ctx, values, config_file, scalar_head=True)


@click.command()
@cli_options(RMConfig)
@click.pass_context
def rm(ctx, config_file, **values):
    """Reward model: the LM trunk plus a scalar head, trained on preference pairs.

    \b
    Default data: both bundled preference files, the explicit pairs and the
    HH-RLHF dialogues (held-out: the explicit pairs' test split), for 300 steps;
    any preference format works (explicit, implicit, HH-RLHF
    dialogues). Loss: Bradley-Terry -log sigmoid(r_chosen - r_rejected - margin),
    with the `margin` column when the data has one, plus --centring-coef times
    mean((r_chosen + r_rejected)^2). The reward is read at the last token.
    Trains a LoRA adapter and the head (--full: every weight). final/ gets
    reward_model.json, so `mlxpost eval --task reward --reward-model RUN/final`
    and RL rewards can load it.
    """
    run("rm", RMConfig, "rm:RewardModel", ctx, values, config_file, scalar_head=True)


@click.command()
@cli_options(DPOConfig)
@click.pass_context
def dpo(ctx, config_file, **values):
    """Direct preference optimisation: DPO/cDPO, IPO, hinge, robust DPO, or KTO.

    \b
    Default data: the bundled preference pairs (held-out: their test split).
    --loss sigmoid | ipo | hinge | robust train on pairs; --loss kto on
    completions labelled desirable or not (prompt/completion/label), paired data
    being split into chosen (desirable) and rejected. The reference is the base
    model with the adapter off (--full: the base checkpoint; or --reference),
    its logprobs precomputed once (--reference-mode precompute) or recomputed
    each step (live). Evaluations report held-out preference accuracy by the
    implicit reward, and optionally greedy math accuracy (--eval-math N) and a
    reward model's mean score of greedy generations (--eval-reward-model DIR).
    """
    run("dpo", DPOConfig, preference_algorithm, ctx, values, config_file)


def preference_algorithm(cfg: DPOConfig) -> str:
    """--loss kto trains KTO, its own algorithm; the paired losses train DPO."""
    return "kto:KTO" if cfg.loss == "kto" else "dpo:DPO"
