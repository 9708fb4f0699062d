"""Reward functions for RL (GRPO, PPO): built-in rules and user functions.

A reward function is batched: `fn(prompts, completions, **columns) -> list[float]`,
where prompts and completions are strings and `columns` holds every other
dataset column as a list (e.g. `answer`). Built-ins are named; a user function
is given as `module:function` or `path/to/file.py:function`; naming a file
imports it, which runs its code.

A function fails on a completion when it raises, returns the wrong number of
values, a non-number or a NaN/inf. When a batched call fails, each completion
is scored alone, so failures stay isolated: a failed completion scores 0 and is
counted in `reward_errors/<name>`. When a function fails on at least
`failure_share` of a step's completions (default: all of them), scoring stops
with a UserError naming the first failing example, after the function's own
traceback has been shown.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlxpost.answers import extract_answer, is_correct
from mlxpost.errors import UserError

RewardFn = Callable[..., list[float]]
MARKER = re.compile(r"####\s*-?\$?\d")


def math_correctness(prompts, completions, answer=None, answer_number=None, **_) -> list[float]:
    """1 if the completion's final number equals the reference answer, else 0."""
    gold = answer_number if answer_number is not None else answer
    if gold is None:
        raise UserError("the math reward needs an `answer` column in the data")
    return [
        1.0 if is_correct(text, str(g) if g is not None else None) else 0.0
        for text, g in zip(completions, gold)
    ]


def answer_format(prompts, completions, **_) -> list[float]:
    """1 if the completion ends with a `#### N` answer marker, else 0."""
    return [1.0 if MARKER.search(text) else 0.0 for text in completions]


def repetition_penalty(prompts, completions, n: int = 3, **_) -> list[float]:
    """Minus the share of repeated word n-grams: loops that pad length cost reward."""
    out = []
    for text in completions:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        out.append(-(len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return out


def answered(prompts, completions, **_) -> list[float]:
    """1 if any final number can be read from the completion."""
    return [1.0 if extract_answer(text) is not None else 0.0 for text in completions]


BUILTIN: dict[str, RewardFn] = {
    "math": math_correctness,
    "format": answer_format,
    "repetition": repetition_penalty,
    "answered": answered,
}


def load_reward(spec: str) -> RewardFn:
    """A built-in name, `module:function` or `file.py:function` (the file's code runs)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise UserError(
            f"unknown reward {spec!r}; built-ins: {', '.join(BUILTIN)}; or give module:function"
        )
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise UserError(f"{where}: reward file not found")
            module_spec = importlib.util.spec_from_file_location(
                os.path.basename(where)[:-3], where
            )
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except ImportError as err:
        raise UserError(f"reward {spec!r}: cannot import {where} ({err})") from err
    except SyntaxError as err:
        raise UserError(
            f"{err.filename}, line {err.lineno}: reward {spec!r} does not parse ({err.msg})"
        ) from err
    except Exception as err:  # the user's module raised while it was being imported
        raise UserError(f"reward {spec!r}: importing {where} raised {describe(err)}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {where} has no function {name}")
    return fn


def describe(err: BaseException) -> str:
    """`Type: message at file, line N` for the innermost frame of a user's exception."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}, line {frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def parse_weights(specs: str, weights: str | None) -> tuple[list[str], np.ndarray]:
    """Reward names and their weights, checked without importing anything; "none" names no
    function (PPO with a reward model alone)."""
    if specs.strip() == "none":
        if weights:
            raise UserError("--reward-weights given with --rewards none")
        return [], np.zeros(0)
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise UserError("--rewards names no reward function")
    if not weights:
        return names, np.ones(len(names))
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise UserError(f"--reward-weights {weights!r}: expected comma-separated numbers") from None
    if len(values) != len(names):
        raise UserError(f"--reward-weights has {len(values)} values for {len(names)} rewards")
    if not np.all(np.isfinite(values)):
        raise UserError(f"--reward-weights {weights!r}: weights must be finite")
    return names, np.asarray(values, np.float64)


class RewardFailure(Exception):
    """One completion a reward function could not score."""


def as_rewards(result, count: int) -> np.ndarray:
    """A function's return value as `count` float64 rewards, or RewardFailure saying why."""
    values = np.asarray(result)
    if values.dtype.kind not in "biuf":
        raise RewardFailure(f"returned {values.dtype} values, not numbers")
    if values.shape != (count,):
        got = values.shape[0] if values.ndim == 1 else f"an array of shape {values.shape}"
        raise RewardFailure(f"returned {got} values for {count} completions")
    return values.astype(np.float64)


def call_reward(fn: RewardFn, prompts, completions, columns) -> tuple[np.ndarray, np.ndarray, list]:
    """(rewards, failed mask, failures as (index, exception)); a failed completion scores 0.

    The batched call comes first; if it fails as a whole, each completion is scored alone."""
    count = len(completions)
    try:
        values = as_rewards(fn(prompts, completions, **columns), count)
    except UserError:  # a built-in saying the data lacks what it needs
        raise
    except Exception:
        values = np.zeros(count)
        failures = []
        for i in range(count):
            try:
                one = {k: v[i : i + 1] for k, v in columns.items()}
                values[i] = as_rewards(fn(prompts[i : i + 1], completions[i : i + 1], **one), 1)[0]
            except Exception as err:
                failures.append((i, err))
    else:
        failures = []
    for i in np.flatnonzero(~np.isfinite(values)):
        failures.append((int(i), RewardFailure(f"returned {values[i]}")))
    failures.sort(key=lambda item: item[0])
    failed = np.zeros(count, bool)
    failed[[i for i, _ in failures]] = True
    return np.where(failed, 0.0, values), failed, failures


def user_traceback(err: BaseException) -> str:
    """The exception's traceback without mlxpost's own frames: what the user's code did."""
    package = os.path.dirname(os.path.abspath(__file__))
    frames = [
        frame
        for frame in traceback.extract_tb(err.__traceback__)
        if not os.path.abspath(frame.filename).startswith(package + os.sep)
    ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(err), err)
    return "".join(lines).rstrip()


@dataclass
class RewardSet:
    names: list[str]
    functions: list[RewardFn]
    weights: np.ndarray
    failure_share: float = 1.0

    @classmethod
    def parse(cls, specs: str, weights: str | None, failure_share: float = 1.0) -> RewardSet:
        names, values = parse_weights(specs, weights)
        return cls(names, [load_reward(n) for n in names], values, failure_share)

    def score(
        self, prompts: list[str], completions: list[str], columns: dict[str, list], warn
    ) -> tuple[np.ndarray, dict]:
        """(weighted total per completion, per-function means and failure counts)."""
        per_function = np.zeros((len(self.names), len(completions)))
        metrics = {}
        for row, (name, fn) in enumerate(zip(self.names, self.functions)):
            values, failed, failures = call_reward(fn, prompts, completions, columns)
            if failures:
                index, err = failures[0]
                example = (
                    f"first failing example {index}: prompt {prompts[index][:80]!r}, "
                    f"completion {completions[index][:80]!r} ({type(err).__name__}: {err})"
                )
                if failed.mean() >= self.failure_share:
                    if not isinstance(err, RewardFailure):
                        warn(f"reward {name} raised:\n{user_traceback(err)}")
                    raise UserError(
                        f"reward {name} failed on {failed.sum()} of {len(completions)} "
                        f"completions; {example}"
                    )
                warn(
                    f"reward {name} failed on {failed.sum()} of {len(completions)} completions, "
                    f"counted as 0; {example}"
                )
            metrics[f"reward_errors/{name}"] = float(failed.sum())
            per_function[row] = values
            metrics[f"reward/{name}"] = float(values.mean())
            metrics[f"reward_std/{name}"] = float(values.std())
        return self.weights @ per_function, metrics
