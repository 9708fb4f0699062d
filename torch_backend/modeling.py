"""Loading transformers models and running them under the logprob contract."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from mlxpost.backend import LoraConfig
from mlxpost.backend_shared.heads import init_scalar_head
from mlxpost.backend_shared.unpad import unpad_plan
from mlxpost.errors import UserError, first_line
from mlxpost.model_dir import read_config
from torch_backend import fsdp

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers' attention kernel per architecture, sdpa where not listed. Gemma-2 soft-caps its
# attention logits, which only the eager kernel does (transformers refuses sdpa for it). On
# every other architecture sdpa gives eager's logits to float32 rounding, left padding and
# per-row positions included (tests/test_model_dir_architectures.py checks each tiny model).
ATTENTION = {"gemma2": "eager"}


@dataclass
class TorchModel:
    module: nn.Module
    arch: str
    config: dict
    path: str
    dtype: str
    lora: dict = field(default_factory=dict)  # module path -> LoRALinear
    lora_cfg: LoraConfig | None = None
    lora_targets: tuple[str, ...] = ()
    score: nn.Linear | None = None
    frozen: dict = field(default_factory=dict)  # role -> TorchModel (reference, teacher)
    logits_chunk: int | None = None  # rows of logits at once in losses (heads.logits_chunk_rows)
    shell: nn.Module | None = None  # the root FSDP unit when sharded (--fsdp, fsdp.py)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if self.score is not None:
            params.update({f"score.{n}": p for n, p in self.score.named_parameters()})
        return params


def load(path: str, dtype: str, device: torch.device) -> TorchModel:
    config = read_config(path, tokenizer=False)  # whole weights that fit config.json
    hf_logging.disable_progress_bar()  # mlxpost reports its own progress
    attn = ATTENTION.get(config["model_type"], "sdpa")
    try:
        module = AutoModelForCausalLM.from_pretrained(
            path, dtype=TORCH_DTYPES[dtype], attn_implementation=attn
        )
    except KeyError as err:  # a name transformers has no entry for, e.g. an activation
        raise UserError(
            f"{path}: transformers cannot load this checkpoint (unknown {err.args[0]!r}; "
            "check config.json)"
        ) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        # What read_config cannot see: a config value transformers rejects, unreadable data.
        raise UserError(
            f"{path}: transformers cannot load this checkpoint ({first_line(err)})"
        ) from None
    module.to(device)
    module.eval()  # dropout off: the model's own dropouts are not part of post-training here
    if dtype == "float32":
        fuse_gelu(module)
    return TorchModel(
        module=module, arch=config["model_type"], config=config, path=path, dtype=dtype
    )


def fuse_gelu(module: nn.Module) -> None:
    """Replace transformers' tanh-approximated GELU written as seven tensor operations
    (NewGELUActivation: GPT-2's gelu_new; FastGELUActivation) by torch's one fused kernel of the
    same formula (F.gelu(approximate="tanh"), transformers' GELUTanh), in place. They agree to
    float32 rounding; the fused kernel reads its input once and keeps one tensor for the
    backward instead of six (on the bundled model it took a fifth of a GRPO training step).
    Only for float32 models: in half precision the operations round at every step and the
    fused kernel once, so there the checkpoint keeps what transformers gives it."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())


def set_grad_checkpoint(model: TorchModel, enabled: bool) -> None:
    """transformers' activation checkpointing of every decoder layer (torch.utils.checkpoint,
    non-reentrant: it preserves the RNG state, so LoRA dropout draws the same masks when
    recomputed, and needs no inputs that require grad, so it holds under LoRA's frozen base).

    transformers checkpoints a layer only while `layer.training`; the model stays in eval mode
    (its dropouts off), so only the layer modules themselves, not their children, are switched
    to training. Calls pass use_cache=False (logits, hidden_states), as checkpointing needs."""

    module = model.module
    if enabled:
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:  # transformers before activation_checkpointing_enable
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        # The hook making embedding outputs require grad is for reentrant checkpointing only.
        if getattr(module, "_require_grads_hook", None) is not None:
            module.disable_input_require_grads()
    else:
        disable = getattr(module, "activation_checkpointing_disable", None)
        (disable or module.gradient_checkpointing_disable)()
    layers = decoder_layers(module)
    if enabled and not layers:
        raise ValueError(f"{model.arch}: no transformer layers to checkpoint")
    for layer in layers:
        layer.training = enabled  # the layer alone: its children (dropouts) stay in eval mode


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only, so left padding does not shift positions; in a
    packed row (segment ids in the mask) they restart at 0 on each segment's first token.
    Padding takes the position of the real token before it (0 before any)."""
    segments = attention_mask.long()
    count = (segments > 0).long().cumsum(-1)  # real tokens up to t
    seen = segments.cummax(-1).values
    previous = torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=-1)
    starts = segments > previous  # each segment's first token (one per row with a 0/1 mask)
    before = torch.where(starts, count - 1, 0).cummax(-1).values  # real tokens before it
    return (count - 1 - before).clamp(min=0)


def segment_mask(segments: torch.Tensor, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """Additive (B, 1, T, T) mask of a packed batch, in the model dtype as transformers' eager
    mask is: 0 where a query may see a key, the dtype's minimum elsewhere. The rule is the MLX
    backend's (models/common.py attention_bias): causal, the key real, the query in the key's
    segment (a padding query sees every real key before it), and within `window` if given."""
    index = torch.arange(segments.shape[1], device=segments.device)
    allowed = index[None, :] <= index[:, None]  # (T, S): key at or before the query
    if window is not None:
        allowed = allowed & (index[:, None] - index[None, :] < window)
    query, key = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, S)
    allowed = allowed[None] & (key > 0) & ((query == key) | (query == 0))
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=segments.device)
    zero = torch.tensor(0.0, dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, blocked)[:, None]


def model_mask(model: TorchModel, attention_mask: torch.Tensor):
    """The attention mask to give the transformers model: a 0/1 mask as it is (transformers
    builds its masks from it); for packed rows (segment ids above 1) masks built here, which
    transformers takes as they are. Models with per-layer attention types (Gemma-2 and -3,
    Qwen-2 and -3) take a dict of one mask per type; the others one mask, windowed on every
    layer where the config has a window (Mistral, Phi-3), as their own mask function is."""
    if not bool((attention_mask > 1).any()):
        return attention_mask
    config = model.module.config
    dtype = TORCH_DTYPES[model.dtype]
    window = getattr(config, "sliding_window", None)
    segments = attention_mask.long()
    types = getattr(config, "layer_types", None)
    if not types:
        return segment_mask(segments, dtype, window)
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"packed rows on layers of type {sorted(unknown)} are not supported")
    return {
        kind: segment_mask(segments, dtype, window if kind == "sliding_attention" else None)
        for kind in set(types)
    }


def logits(
    model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    out = model.module(
        input_ids=input_ids,
        attention_mask=model_mask(model, attention_mask),
        position_ids=positions(attention_mask),
        use_cache=False,
    )
    return out.logits  # (B, T, V), model dtype


NO_PLAN = object()


def hidden_states(
    model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan=NO_PLAN
) -> torch.Tensor:
    """Final hidden states (B, T, H), after the final norm. A batch that is mostly padding
    runs its trunk packed (backend_shared/unpad.py), its padding positions' states 0; `plan`
    is that plan when the caller has it (None: run padded)."""
    if plan is NO_PLAN:
        plan = unpad_plan(attention_mask.cpu().numpy())
    if plan is None:
        return trunk(model, input_ids, attention_mask)
    device = input_ids.device
    flat_ids = torch.cat([input_ids.reshape(-1), input_ids.new_zeros(1)])
    packed_ids = flat_ids[torch.as_tensor(plan.gather, device=device)]
    hidden = trunk(model, packed_ids, torch.as_tensor(plan.segments, device=device))
    flat = torch.cat([hidden.reshape(-1, hidden.shape[-1]), hidden.new_zeros(1, hidden.shape[-1])])
    restored = flat.index_select(0, torch.as_tensor(plan.restore, device=device))
    return restored.view(*input_ids.shape, hidden.shape[-1])


def trunk(model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The transformers base model's final hidden states (B, T, H) for these rows as laid out."""
    out = model.module.base_model(
        input_ids=input_ids,
        attention_mask=model_mask(model, attention_mask),
        position_ids=positions(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def lm_logits(model: TorchModel, hidden: torch.Tensor) -> torch.Tensor:
    """(..., H) final hidden states -> (..., V) logits in the model dtype. Gemma-2 and -3 cap
    their logits after the head, as their forward does (transformers' config, not
    config.json: Gemma-2's default cap applies when config.json leaves it out)."""
    return soft_cap(model, model.module.lm_head(hidden))


def soft_cap(model: TorchModel, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft-capping (Gemma-2, -3), or the logits unchanged."""
    cap = getattr(model.module.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def attach_scalar_head(model: TorchModel, seed: int) -> None:
    weight, bias = init_scalar_head(model_hidden_size(model), seed)
    head = nn.Linear(weight.shape[1], 1, dtype=torch.float32, device=model.module.device)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    model.score = head


def scores(
    model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    if model.score is None:
        raise ValueError("this model has no scalar head; attach one first")
    hidden = hidden_states(model, input_ids, attention_mask)
    return model.score(hidden.float())[..., 0]  # (B, T)


def model_hidden_size(model: TorchModel) -> int:
    return int(model.config.get("hidden_size") or model.config["n_embd"])


def to_numpy_params(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 numpy snapshots: copies, never views of the live CPU tensors (an optimizer
    step must not change an array already returned). Sharded parameters are gathered: every
    rank of a sharded model must call this."""
    return {
        n: fsdp.full(p.detach()).to("cpu", torch.float32, copy=True).numpy()
        for n, p in params.items()
    }


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers causal LM, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
