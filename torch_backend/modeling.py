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
from mlxpost.errors import UserError, first_line
from mlxpost.model_dir import read_config

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
    return TorchModel(
        module=module, arch=config["model_type"], config=config, path=path, dtype=dtype
    )


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logits(
    model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    out = model.module(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    )
    return out.logits  # (B, T, V), model dtype


def hidden_states(
    model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    out = model.module.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state  # (B, T, H), after the final norm


def logits_and_scores(model: TorchModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Logits and scalar-head outputs from one pass through the trunk (a PPO critic on the
    policy's own trunk)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    logits = model.module.lm_head(hidden)
    # Gemma-2 and -3 cap their logits after the head, as their forward does (transformers'
    # config, not config.json: Gemma-2's default cap applies when config.json leaves it out).
    cap = getattr(model.module.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, model.score(hidden.float())[..., 0]


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
    step must not change an array already returned)."""
    return {n: p.detach().to("cpu", torch.float32, copy=True).numpy() for n, p in params.items()}
