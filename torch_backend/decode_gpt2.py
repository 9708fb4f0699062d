"""GPT-2's decode step written out over the model's own modules, for the sampler on CPU.

transformers' GPT-2 forward spends most of a small decode step in Python: the model's output
wrappers, per-layer keyword plumbing, the attention-interface lookup and the cache protocol
(measured on a 2-core machine: a 1-row step of the bundled model took 3.1 ms through
`base_model`, 1.6 ms written out). This step runs the same modules (embeddings, layer norms,
the attention and MLP projections, so LoRA wrappers included) and transformers' eager
attention's operations in its order, on the sampler's own cache and masks; only the Python
around them is gone. It applies where the sampler runs eager attention (CPU, float32: see
sampling.eager_attention) on a plain GPT-2 block; every other case runs transformers' forward.

GPT-2's projections (Conv1D) keep their weights as (in, out) and multiply with addmm; at the
few rows of a decode step MKL tends to run nn.Linear's (out, in) layout faster. `linear_weights`
makes (out, in) copies once per sampling call, an adapter folded in where
lora.merged_for_inference folded it, and the step multiplies with them: the same products,
rounded in another order (float32 rounding). Measured A/B in one process on a 2-core CPU, the
sampler ran 1.02-1.35x faster with them (124M shape at 8 and 64 rows; the bundled model
1.07-1.13x at 16 and 64 rows), for a copy of the projections' weights while it runs (none past
LAYOUT_LIMIT_BYTES).
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from torch_backend.lora import LoRALinear
from torch_backend.modeling import TorchModel

LAYOUT_LIMIT_BYTES = 1 << 30  # most memory the (out, in) copies may take


def applies(model: TorchModel) -> bool:
    """Whether `hidden` computes this model's decode steps: a GPT-2 whose blocks are the plain
    ones (no cross-attention, no upcast-and-reorder attention), under eager attention."""
    config = model.module.config
    return (
        config.model_type == "gpt2"
        and config._attn_implementation == "eager"
        and not getattr(config, "add_cross_attention", False)
        and not getattr(config, "reorder_and_upcast_attn", False)
        and not model.module.training
        and all(hasattr(block.attn, "scaling") for block in model.module.transformer.h)
    )


def projections(block) -> tuple:
    """A block's four projections in the order `hidden` uses them."""
    return block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj


def linear_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as (out, in), bias) of what a projection computes now, or None where it is not
    one Conv1D matmul (an adapter left unfolded, another layer type)."""
    base, weight = layer, getattr(layer, "weight", None)
    if isinstance(layer, LoRALinear):
        base = layer.base_layer
        if not layer.enabled:
            weight = base.weight
        elif layer.merged is not None:
            weight = layer.merged
        else:
            return None
    if not isinstance(base, Conv1D):
        return None
    return weight.detach().t().contiguous(), base.bias


def linear_weights(model: TorchModel, limit_bytes: int | None = None) -> list | None:
    """Per block, its projections' linear_weight, or None (the step then calls the modules)
    when one of them is not a plain matmul or the copies would exceed `limit_bytes` (default
    LAYOUT_LIMIT_BYTES)."""
    blocks = [projections(block) for block in model.module.transformer.h]
    size = sum(layer_bytes(layer) for layers in blocks for layer in layers)
    if size > (LAYOUT_LIMIT_BYTES if limit_bytes is None else limit_bytes):
        return None
    prepared = [[linear_weight(layer) for layer in layers] for layers in blocks]
    return None if any(p is None for layers in prepared for p in layers) else prepared


def layer_bytes(layer) -> int:
    weight = layer.base_layer.weight if isinstance(layer, LoRALinear) else layer.weight
    return weight.numel() * weight.element_size()


def hidden(model: TorchModel, ids, mask, position_ids, cache, weights=None) -> torch.Tensor:
    """Final hidden states (B, T, H) of the new tokens, their keys and values written into the
    cache (DecodeCache, its slots set by the caller): GPT2Model.forward's operations for the
    blocks `applies` accepts, with the additive (B, 1, T, S) mask given whole. `weights`:
    linear_weights' copies to multiply with (None: the projection modules themselves)."""
    body = model.module.transformer
    x = body.wte(ids) + body.wpe(position_ids)
    for index, block in enumerate(body.h):
        attn, project = block.attn, projector(block, None if weights is None else weights[index])
        h = block.ln_1(x)
        query, key, value = project(0, h).split(attn.split_size, dim=2)
        heads = (*h.shape[:-1], -1, attn.head_dim)
        query = query.view(heads).transpose(1, 2)
        key, value = cache.update(
            key.view(heads).transpose(1, 2), value.view(heads).transpose(1, 2), index
        )
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scaling
        probs = torch.softmax(scores + mask, dim=-1).type(value.dtype)
        out = torch.matmul(probs, value).transpose(1, 2)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        x = project(1, out) + x
        x = x + project(3, block.mlp.act(project(2, block.ln_2(x))))  # GPT2MLP; dropout is off
    return body.ln_f(x)


def projector(block, prepared):
    """project(k, x): the block's k-th projection of x, through its module or its copy."""
    layers = projections(block)
    if prepared is None:
        return lambda k, x: layers[k](x)
    return lambda k, x: torch.nn.functional.linear(x, *prepared[k])
