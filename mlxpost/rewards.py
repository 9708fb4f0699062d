"""Reward functions for RL (GRPO, PPO): built-in rules and user functions.

A reward function is batched: `fn(prompts, completions, **columns) -> list[float]`,
where prompts and completions are strings and `columns` holds every other
dataset column as a list (e.g. `answer`). Built-ins are named; a user function
is given as `module:function` or `path/to/file.py:function`. A function that
raises is reported with the first example it fails on; its rewards for that
batch count as 0 and the run goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
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
    """A built-in name, `module:function` or `file.py:function`."""
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
    except ImportError as err:
        raise UserError(f"reward {spec!r}: cannot import {where} ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {where} has no function {name}")
    return fn


@dataclass
class RewardSet:
    names: list[str]
    functions: list[RewardFn]
    weights: np.ndarray

    @classmethod
    def parse(cls, specs: str, weights: str | None) -> RewardSet:
        names = [s.strip() for s in specs.split(",") if s.strip()]
        if not names:
            raise UserError("--rewards names no reward function")
        values = [float(w) for w in weights.split(",")] if weights else [1.0] * len(names)
        if len(values) != len(names):
            raise UserError(f"--reward-weights has {len(values)} values for {len(names)} rewards")
        return cls(names, [load_reward(n) for n in names], np.asarray(values, np.float64))

    def score(
        self, prompts: list[str], completions: list[str], columns: dict[str, list], warn
    ) -> tuple[np.ndarray, dict]:
        """(weighted total per completion, per-function means and error counts)."""
        per_function = np.zeros((len(self.names), len(completions)))
        metrics = {}
        for row, (name, fn) in enumerate(zip(self.names, self.functions)):
            try:
                values = np.asarray(fn(prompts, completions, **columns), np.float64)
                if values.shape != (len(completions),):
                    raise ValueError(
                        f"returned {values.shape[0] if values.ndim else 'a scalar'} values for {len(completions)} completions"
                    )
                if not np.all(np.isfinite(values)):
                    raise ValueError("returned a non-finite value")
            except UserError:
                raise
            except Exception as err:  # a user's function must not end the run
                index = first_failure(fn, prompts, completions, columns)
                warn(
                    f"reward {name} failed ({type(err).__name__}: {err}); first failing example {index}: prompt {prompts[index][:80]!r}, completion {completions[index][:80]!r}; counted as 0"
                )
                values = np.zeros(len(completions))
                metrics[f"reward_errors/{name}"] = 1.0
            per_function[row] = values
            metrics[f"reward/{name}"] = float(values.mean())
            metrics[f"reward_std/{name}"] = float(values.std())
        return self.weights @ per_function, metrics


def first_failure(fn, prompts, completions, columns) -> int:
    """The index of the first example the function raises on alone (0 if none does)."""
    for i in range(len(completions)):
        try:
            fn(
                prompts[i : i + 1],
                completions[i : i + 1],
                **{k: v[i : i + 1] for k, v in columns.items()},
            )
        except Exception:
            return i
    return 0
