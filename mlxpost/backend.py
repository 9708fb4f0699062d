"""The backend interface every algorithm is written against.

A backend owns everything that touches a framework: model loading, LoRA,
forward passes, sampling, autodiff and the optimizer. Algorithms hand it numpy
arrays and pure loss functions; they never import mlx or torch. A backend
module is imported only when `get_backend` is asked for it.
"""

from __future__ import annotations

import contextlib
import importlib
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mlxpost.distributed import launcher
from mlxpost.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")

# LoRA targets per architecture when the user names none: every attention and
# MLP projection, as PEFT users commonly choose for small models.
LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gemma2": LLAMA_LIKE_TARGETS,
    "llama": LLAMA_LIKE_TARGETS,
    "mistral": LLAMA_LIKE_TARGETS,
    "qwen2": LLAMA_LIKE_TARGETS,
    "qwen3": LLAMA_LIKE_TARGETS,
    "gemma3_text": LLAMA_LIKE_TARGETS,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q/k/v and gate/up
}


@dataclass
class LoraConfig:
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input path."})
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt (last path component); None: architecture default."
        },
    )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class OptimConfig:
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled (AdamW) weight decay."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; None: no clipping."}
    )
    # Warmup and floor are the training commands' own defaults (TrainConfig), so a library
    # user and `mlxpost sft` get the same schedule unless they say otherwise.
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps from 0."})
    total_steps: int = field(default=1000, metadata={"help": "Steps of the whole schedule."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine decay ends at learning_rate * min_lr_ratio."}
    )


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated at most."})
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature; 0 means greedy decoding."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(
        default=0, metadata={"help": "Sample among the k likeliest tokens (0: off)."}
    )
    n: int = field(default=1, metadata={"help": "Samples per prompt, sharing one prompt prefill."})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be at least 1, got {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                f"{self.top_p}, {self.top_k}"
            )


@dataclass
class Samples:
    """Sampling results, all numpy, one row per sample (prompt-major: prompt i's
    samples are rows i*n .. i*n+n-1).

    `logprobs` are behaviour logprobs under the trainer's definition:
    log_softmax(logits / temperature) of the full distribution, before top-k /
    top-p truncation (truncation only decides which tokens can be drawn). With
    temperature 0 (greedy) they are taken at temperature 1.
    """

    prompt_ids: np.ndarray  # (N, P) int32, left padded
    prompt_mask: np.ndarray  # (N, P) int32
    completion_ids: np.ndarray  # (N, C) int32, right padded with pad_id
    completion_mask: np.ndarray  # (N, C) int32: generated tokens up to and including EOS
    logprobs: np.ndarray  # (N, C) float32, 0 where masked
    finished: np.ndarray  # (N,) bool: stopped at EOS (False: truncated at max_new_tokens)
    prompt_index: np.ndarray  # (N,) int: which prompt each row came from


class Ops(Protocol):
    """The array namespace loss functions are written in (see mlxpost.ops)."""


LossFn = Callable[[Any, "Forward", dict], tuple[Any, dict]]


class Forward(Protocol):
    """Differentiable view of a model handed to a loss function.

    Losses read per-token logprobs, entropy and divergences through
    mlxpost.functional.head_terms, which never holds the whole (B, T, V) logits: it asks for
    the final hidden states and maps the head over chunks of rows (map_head_rows)."""

    def hidden(self, input_ids: Any, attention_mask: Any) -> Any:
        """(B, T, H) final hidden states (after the last norm), in the model dtype."""

    def hidden_and_scores(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        """The hidden states and the scalar head's (B, T) float32 outputs on them."""

    def frozen_hidden(self, role: str, input_ids: Any, attention_mask: Any) -> Any:
        """Hidden states of a frozen model ("reference": the adapter switched off unless a
        reference checkpoint was attached; "teacher"), carrying no gradient."""

    def head(self, hidden: Any, role: str | None = None) -> Any:
        """(..., V) float32 logits of hidden states (..., H) through this model's head, or
        (role) the frozen model's, carrying no gradient; soft-capped where configured."""

    def map_head_rows(self, fn: Callable, rows: Any, role: str | None = None) -> dict:
        """fn(rows[chunk], chunk) -> {name: (n,) array} over chunks of rows (N, H), joined
        into {name: (N,)}; where gradients flow, each chunk is recomputed in the backward pass
        (the backend's logits_chunk setting says how many rows a chunk holds)."""

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        """(B, T, V) float32 logits; row t predicts token t+1."""

    def scores(self, input_ids: Any, attention_mask: Any) -> Any:
        """(B, T) float32 scalar-head outputs on the final hidden states."""

    def logits_and_scores(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        """Both of the above from one pass through the trunk."""

    def frozen_logits(self, role: str, input_ids: Any, attention_mask: Any) -> Any:
        """(B, T, V) float32 logits of a frozen model ("reference": the adapter switched off
        unless a reference checkpoint was attached; "teacher"), carrying no gradient."""


class Backend(Protocol):
    name: str
    ops: Any

    def describe(self) -> str: ...

    # models
    def load_model(self, path: str, dtype: str = "float32", quantize: int | None = None) -> Any:
        """The checkpoint at `path` in `dtype`; with `quantize` (4 or 8 bits) the linear layers
        of its transformer blocks are quantized (QLoRA's frozen base; LoRA only)."""

    def attach_scalar_head(self, model: Any, seed: int = 0) -> None: ...
    def attach_lora(self, model: Any, cfg: LoraConfig, seed: int = 0) -> None: ...
    def attach_frozen(self, model: Any, role: str, other: Any) -> None: ...
    def set_adapter_enabled(self, model: Any, enabled: bool) -> None: ...
    def save_adapter(self, model: Any, directory: str) -> None: ...
    def load_adapter(self, model: Any, directory: str) -> None: ...
    def parameters(self, model: Any, trainable_only: bool = False) -> dict[str, np.ndarray]: ...
    def set_parameters(self, model: Any, params: dict[str, np.ndarray]) -> None: ...
    def parameter_count(self, model: Any) -> tuple[int, int]: ...
    def set_logits_chunk(self, model: Any, rows: int | None) -> None:
        """Rows (token positions) of logits a loss computes at once: None the default (64 MB
        of float32 logits), 0 all at once."""
        ...

    def shard_weights(self, model: Any) -> None:
        """Full fine-tuning sharded over the data-parallel ranks (--fsdp): each rank keeps its
        share of the weights, gradients and optimizer moments. The model's calls stay the same
        but become collective: every rank makes them (torch only; MLX refuses)."""
        ...

    def set_grad_checkpoint(self, model: Any, enabled: bool) -> None:
        """Recompute each transformer block's activations in the backward pass (less memory,
        the same losses and gradients) while enabled; frozen models never need it."""
        ...

    # compute (no gradients)
    def logprobs(
        self,
        model: Any,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        temperature: float = 1.0,
    ) -> np.ndarray: ...
    def hidden_states(
        self, model: Any, input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> np.ndarray: ...
    def token_logits(
        self, model: Any, input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> np.ndarray: ...
    def scores(
        self, model: Any, input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> np.ndarray: ...
    def sample(
        self,
        model: Any,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int,
    ) -> Samples: ...

    # training
    def make_optimizer(self, model: Any, cfg: OptimConfig) -> Any: ...
    def loss_and_grads(
        self, model: Any, loss_fn: LossFn, batch: dict[str, np.ndarray]
    ) -> tuple[float, dict, dict[str, np.ndarray]]: ...
    def compute_loss(
        self, model: Any, loss_fn: LossFn, batch: dict[str, np.ndarray]
    ) -> tuple[float, dict]: ...
    def train_step(
        self,
        model: Any,
        optimizer: Any,
        loss_fn: LossFn,
        microbatches: Sequence[dict[str, np.ndarray]],
        weights: Sequence[float] | None = None,
    ) -> dict[str, float]: ...
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]: ...
    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None: ...
    def seed(self, seed: int) -> None: ...
    def peak_memory_gb(self) -> float | None:
        """Peak memory so far in GB (2**30 bytes): MLX's allocator peak; on CUDA torch's
        max allocated; on CPU the process's resident high-water mark."""
        ...

    # checkpoint tensors (merge, soup): tensors stay in the checkpoint's dtype (numpy has no
    # bfloat16); only those the arithmetic touches go through numpy, as float64
    def open_safetensors(self, path: str) -> Callable[[str], Any]: ...  # key -> tensor
    def tensor_to_numpy(self, tensor: Any) -> np.ndarray: ...
    def tensor_from_numpy(self, array: np.ndarray, like: Any) -> Any: ...  # like's dtype
    def is_float_tensor(self, tensor: Any) -> bool: ...
    def save_safetensors(self, tensors: dict[str, Any], path: str) -> None: ...


BACKENDS = {"mlx": "mlxpost.mlx_backend", "torch": "torch_backend"}
BACKEND_CHOICES = ("auto", *BACKENDS)  # what --backend accepts, on every command


def default_backend_name() -> str:
    """The backend of the launcher that started this process (torchrun, mlx.launch); else
    mlx on Apple Silicon, torch elsewhere."""
    if launcher():
        return launcher()
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch"


def get_backend(name: str = "auto") -> Backend:
    """Import and return the chosen backend; only that framework is imported."""
    if name == "auto":
        name = default_backend_name()
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as err:
        extra = "mlx" if name == "mlx" else "torch"
        raise BackendUnavailable(
            f"the {name} backend is not installed ({err}); install it with "
            f"pip install 'mlxpost[{extra}]'"
        ) from err
    return module.Backend()


class BackendUnavailable(UserError, ImportError):
    """The chosen backend's framework is not installed."""


@contextlib.contextmanager
def adapter_disabled(backend: Backend, model: Any) -> Iterator[None]:
    """The reference model: the same weights with the LoRA adapter switched off."""
    backend.set_adapter_enabled(model, False)
    try:
        yield
    finally:
        backend.set_adapter_enabled(model, True)
