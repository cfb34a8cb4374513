"""Attention that keeps less for the backward pass: the inputs SDPA would save are rebuilt there instead.

SD3 / SD3.5's joint attention normalises q and k (RMS norm), concatenates the image and text streams and hands
the result to SDPA, which keeps its own q, k and v for the backward pass: copies of what the norms already keep
(their inputs, the projections' outputs). `RecomputedInputsJointAttnProcessor` runs everything between the
projections and SDPA's output under selective activation checkpointing: the attention's results (fused kernel or
math path) are kept; the norms, reshapes and concatenation run again in the backward pass. Elementwise work for,
on an SD3.5-medium-proportioned model, 43 MB of a Flow-DPO step's 299 (benchmarks/flow_dpo_step.py); the same
outputs and gradients as diffusers' processor (tests/test_models_attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError

_ATEN = torch.ops.aten
# Kept, not recomputed: attention itself, its fused kernels or the math path's batched matmuls and softmax (the
# math path is SDPA's fallback, and what the FLOP counter forces). Everything else in the region (norms, views,
# concatenation, casts) is cheap to run again.
_KEPT_OPS = {getattr(_ATEN, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "bmm", "baddbmm", "_softmax",
) if hasattr(_ATEN, name)}


def _keep_attention_outputs(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_attention_outputs)


def _joint_attention(attn, query, key, value, context_query=None, context_key=None, context_value=None):
    """diffusers' JointAttnProcessor2_0 from the projections' outputs to the attention's (batch, tokens, width)
    output (image tokens first, then text tokens)."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads

    def heads(x):
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(query), heads(key), heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if context_query is not None:
        context_query, context_key, context_value = heads(context_query), heads(context_key), heads(context_value)
        if attn.norm_added_q is not None:
            context_query = attn.norm_added_q(context_query)
        if attn.norm_added_k is not None:
            context_key = attn.norm_added_k(context_key)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class RecomputedInputsJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3 / SD3.5: joint and image-only attention), the same outputs, with
    SDPA's inputs rebuilt in the backward pass instead of kept (module docstring). No-grad calls run plainly."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        image_tokens = hidden_states.shape[1]
        projections = [attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)]
        if encoder_hidden_states is not None:
            projections += [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                            attn.add_v_proj(encoder_hidden_states)]
        if torch.is_grad_enabled():
            out = checkpoint(_joint_attention, attn, *projections, use_reentrant=False,
                             context_fn=_selective_contexts)
        else:
            out = _joint_attention(attn, *projections)
        if encoder_hidden_states is not None:
            out, context_out = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                context_out = attn.to_add_out(context_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context_out) if encoder_hidden_states is not None else out


def recompute_attention_inputs(model: torch.nn.Module) -> int:
    """Give every attention module of an SD3 / SD3.5 transformer the processor above; returns how many. Other
    attention processors (FLUX's, Wan's, the UNet's) are refused by name: their math differs."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    modules = [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
    others = sorted({type(m.processor).__name__ for m in modules
                     if not isinstance(m.processor, (JointAttnProcessor2_0, RecomputedInputsJointAttnProcessor))})
    if not modules or others:
        found = ", ".join(others) or "no diffusers attention modules"
        raise ConfigError(f"config key 'recompute_attention_inputs': for SD3 / SD3.5 joint attention "
                          f"(JointAttnProcessor2_0); {type(model).__name__} has {found}")
    for m in modules:
        m.set_processor(RecomputedInputsJointAttnProcessor())
    return len(modules)
