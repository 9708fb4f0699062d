"""GPT-2's decode step written out over the model's own modules, for the sampler on CPU.

transformers' GPT-2 forward spends most of a small decode step in Python: the model's output
wrappers, per-layer keyword plumbing, the attention-interface lookup and the cache protocol
(measured on a 2-core machine: a 1-row step of the bundled model took 3.1 ms through
`base_model`, 1.6 ms written out). This step runs the same modules (embeddings, layer norms,
the attention and MLP projections, so LoRA wrappers included) and transformers' eager
attention's operations in its order, on the sampler's own cache and masks; only the Python
around them is gone. It applies where the sampler runs eager attention (CPU, float32: see
sampling.eager_attention) on a plain GPT-2 block; every other case runs transformers' forward.
"""

from __future__ import annotations

import torch

from torch_backend.modeling import TorchModel


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


def hidden(model: TorchModel, ids, mask, position_ids, cache) -> torch.Tensor:
    """Final hidden states (B, T, H) of the new tokens, their keys and values written into the
    cache (DecodeCache, its slots set by the caller): GPT2Model.forward's operations for the
    blocks `applies` accepts, with the additive (B, 1, T, S) mask given whole."""
    body = model.module.transformer
    x = body.wte(ids) + body.wpe(position_ids)
    for index, block in enumerate(body.h):
        attn = block.attn
        h = block.ln_1(x)
        query, key, value = attn.c_attn(h).split(attn.split_size, dim=2)
        heads = (*h.shape[:-1], -1, attn.head_dim)
        query = query.view(heads).transpose(1, 2)
        key, value = cache.update(
            key.view(heads).transpose(1, 2), value.view(heads).transpose(1, 2), index
        )
        weights = torch.matmul(query, key.transpose(-1, -2)) * attn.scaling
        weights = torch.softmax(weights + mask, dim=-1).type(value.dtype)
        out = torch.matmul(weights, value).transpose(1, 2)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        x = attn.c_proj(out) + x
        x = x + block.mlp(block.ln_2(x))
    return body.ln_f(x)
