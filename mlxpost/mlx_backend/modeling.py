"""Loading mlxpost's MLX models and running them under the logprob contract.

Mirrors torch_backend/modeling.py; the architectures themselves live in models/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxpost.backend import LoraConfig
from mlxpost.backend_shared.heads import init_scalar_head
from mlxpost.errors import UserError, first_line
from mlxpost.mlx_backend.lora import named_parameters, replace_module
from mlxpost.mlx_backend.models.common import load_model
from mlxpost.mlx_backend.models.gpt2 import Conv1D
from mlxpost.model_dir import read_config

MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANTIZE_BITS = (4, 8)
QUANTIZE_GROUP_SIZE = 64  # weights per scale/bias pair (MLX affine quantization)
BLOCK = re.compile(r"(^|\.)(layers|h)\.\d+\.")  # a module inside a transformer block


@dataclass
class MLXModel:
    module: nn.Module  # parameters named like transformers' modules; a scalar head is `score`
    arch: str
    config: dict
    path: str
    dtype: str
    lora: dict = field(default_factory=dict)  # module path -> LoRALinear
    lora_cfg: LoraConfig | None = None
    lora_targets: tuple[str, ...] = ()
    frozen: dict = field(default_factory=dict)  # role -> MLXModel (reference, teacher)
    logits_chunk: int | None = None  # rows of logits at once in losses (heads.logits_chunk_rows)
    grad_functions: dict = field(
        default_factory=dict
    )  # compiled value-and-grad per loss (training.py)

    @property
    def has_score(self) -> bool:
        return "score" in self.module

    def named_trainable(self) -> dict[str, mx.array]:
        return named_parameters(self.module, trainable_only=True)


def load(path: str, dtype: str, quantize: int | None = None) -> MLXModel:
    config = read_config(path, tokenizer=False)  # whole weights that fit config.json
    try:
        module = load_model(path, MLX_DTYPES[dtype])
    except KeyError as err:  # the model code reads config.json's keys directly
        raise UserError(f"{path}/config.json: no {err.args[0]!r}, which the model needs") from None
    except (OSError, ValueError, RuntimeError) as err:
        # What read_config cannot see: a config value the model code rejects, unreadable data.
        raise UserError(f"{path}: cannot load this checkpoint ({first_line(err)})") from None
    module.eval()
    if quantize is not None:
        if quantize not in QUANTIZE_BITS:
            raise UserError(f"--quantize {quantize}: choose 4 or 8 bits")
        quantize_base(module, quantize)
    return MLXModel(module=module, arch=config["model_type"], config=config, path=path, dtype=dtype)


def quantize_base(module: nn.Module, bits: int, group_size: int = QUANTIZE_GROUP_SIZE) -> list[str]:
    """Quantize, in place, the linear layers of the transformer blocks (QLoRA's frozen base):
    MLX affine quantization, `bits` per weight, one scale and bias per `group_size` weights
    of a row. Returns the quantized module paths.

    Embeddings and the LM head keep the model dtype: they are the logprobs' first and last
    step (the tied head is the embedding itself), LoRA does not target them, and the blocks
    hold most of the weights of any model worth quantizing. A layer whose input width is not a
    multiple of `group_size` stays as it is. GPT-2's Conv1D (weight stored (in, out)) becomes
    the equivalent nn.Linear first. The scalar head `score` is never quantized."""
    for path, child in list(module.named_modules()):
        if isinstance(child, Conv1D) and BLOCK.search(path) and not path.endswith("score"):
            linear = nn.Linear(*child.weight.shape)  # (in, out)
            linear.weight = mx.contiguous(child.weight.T)
            linear.bias = child.bias
            replace_module(module, path, linear)

    done = []

    def in_block(path: str, child: nn.Module) -> bool:
        take = (
            isinstance(child, nn.Linear)
            and bool(BLOCK.search(path))
            and not path.endswith("score")
            and child.weight.shape[1] % group_size == 0
        )
        if take:
            done.append(path)
        return take

    nn.quantize(module, group_size=group_size, bits=bits, mode="affine", class_predicate=in_block)
    module.freeze()
    mx.eval(module.parameters())
    return done


def positions(attention_mask: mx.array) -> mx.array:
    """Position ids counting real tokens only, so left padding does not shift positions; in a
    packed row (segment ids in the mask) they restart at 0 on each segment's first token.
    Padding takes the position of the real token before it (0 before any)."""
    segments = attention_mask.astype(mx.int32)
    count = mx.cumsum((segments > 0).astype(mx.int32), axis=1)  # real tokens up to t
    seen = mx.cummax(segments, axis=1)
    previous = mx.concatenate([mx.zeros_like(seen[:, :1]), seen[:, :-1]], axis=1)
    starts = segments > previous  # each segment's first token (one per row with a 0/1 mask)
    before = mx.cummax(mx.where(starts, count - 1, 0), axis=1)  # real tokens before it
    return mx.maximum(count - 1 - before, 0)


def hidden_states(
    model: MLXModel, input_ids: mx.array, attention_mask: mx.array, plan=None
) -> mx.array:
    """Final hidden states (B, T, H). With `plan` (the arrays of backend_shared/unpad.py's
    plan_arrays, gather, segments and restore first) the trunk runs on the packed rows and the states go back to the
    padded layout, padding positions 0."""
    if plan is None:
        return model.module(input_ids, positions(attention_mask), attention_mask)
    gather, segments, restore = plan[:3]
    flat_ids = mx.concatenate([input_ids.reshape(-1), mx.zeros((1,), input_ids.dtype)])
    packed = model.module(flat_ids[gather], positions(segments), segments)
    size = packed.shape[-1]
    flat = mx.concatenate([packed.reshape(-1, size), mx.zeros((1, size), packed.dtype)])
    return flat[restore].reshape(*input_ids.shape, size)


def logits(model: MLXModel, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
    return model.module.lm_logits(hidden_states(model, input_ids, attention_mask))  # (B, T, V)


def attach_scalar_head(model: MLXModel, seed: int) -> None:
    weight, bias = init_scalar_head(model_hidden_size(model), seed)
    head = nn.Linear(weight.shape[1], 1)
    head.weight, head.bias = mx.array(weight), mx.array(bias)
    model.module.score = head


def scores(model: MLXModel, input_ids: mx.array, attention_mask: mx.array, plan=None) -> mx.array:
    if not model.has_score:
        raise ValueError("this model has no scalar head; attach one first")
    hidden = hidden_states(model, input_ids, attention_mask, plan)
    return model.module.score(hidden.astype(mx.float32))[..., 0]  # (B, T)


def model_hidden_size(model: MLXModel) -> int:
    return int(model.config.get("hidden_size") or model.config["n_embd"])


def to_numpy_params(params: dict[str, mx.array]) -> dict[str, np.ndarray]:
    return {n: np.array(p.astype(mx.float32)) for n, p in params.items()}
