"""Attention that keeps less for the backward pass: the inputs SDPA would save are rebuilt there instead.

Diffusion transformers normalise q and k (RMS norm), rotate them (FLUX, Wan: rotary position embeddings) and, in
joint attention, concatenate the image and text streams before SDPA, which keeps its own q, k and v for the
backward pass: copies of what the norms already keep (their inputs, the projections' outputs). The processors here
run everything between the q / k / v projections and SDPA's output under selective activation checkpointing: the
attention's results (fused kernel or math path) are kept; the norms, reshapes, rotations and concatenation run
again in the backward pass. Elementwise work for, on an SD3.5-medium-proportioned model, 43 MB of a Flow-DPO
step's 299 (benchmarks/flow_dpo_step.py). One processor per diffusers processor it stands in for, each the same
outputs and gradients as the original (tests/test_models_attention.py):

    SD3 / SD3.5   JointAttnProcessor2_0  ->  RecomputedInputsJointAttnProcessor
    FLUX          FluxAttnProcessor      ->  RecomputedInputsFluxAttnProcessor   (double- and single-stream blocks)
    Wan 2.1 / 2.2 WanAttnProcessor       ->  RecomputedInputsWanAttnProcessor    (self-, cross- and I2V attention)

The projections stay outside the checkpointed region (re-running them would redo matmuls; their outputs are kept
anyway, as the norms' inputs), and so do the output projections.
Where q and k are neither normalised nor rotated (SD3-medium has no qk-norm) there is no second copy to save:
the same memory either way (benchmarks/memory_tools_world.py: the world's image model 1.00x, its Wan-design
video model 0.89x).
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


def _checkpointed(region, *args):
    """region(*args), under selective activation checkpointing when gradients are recorded (a no-grad call, such as
    a reference forward, keeps nothing anyway)."""
    if not torch.is_grad_enabled():
        return region(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(region, *args, use_reentrant=False, context_fn=_selective_contexts)


def _sdpa(query, key, value, attention_mask=None):
    """SDPA on (batch, tokens, heads, head_dim) tensors -> (batch, tokens, heads * head_dim), as diffusers'
    dispatch_attention_fn does with its native backend."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).flatten(2, 3)


class RecomputedInputsJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3 / SD3.5: joint and image-only attention), the same outputs, with
    SDPA's inputs rebuilt in the backward pass instead of kept (module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image_tokens = hidden_states.shape[1]
        projections = [attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)]
        if encoder_hidden_states is not None:
            projections += [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                            attn.add_v_proj(encoder_hidden_states)]
        out = _checkpointed(_joint_attention, attn, *projections)
        if encoder_hidden_states is not None:
            out, context_out = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                context_out = attn.to_add_out(context_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context_out) if encoder_hidden_states is not None else out


def _flux_attention(attn, query, key, value, context_query, context_key, context_value, rotary, attention_mask):
    """diffusers' FluxAttnProcessor from the projections' outputs to the attention's output (text tokens first,
    then image tokens, in the double-stream blocks)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
    if context_query is not None:
        query = torch.cat([attn.norm_added_q(heads(context_query)), query], dim=1)
        key = torch.cat([attn.norm_added_k(heads(context_key)), key], dim=1)
        value = torch.cat([heads(context_value), value], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return _sdpa(query, key, value, attention_mask).to(query.dtype)


class RecomputedInputsFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (FLUX.1: double-stream joint attention and the single-stream blocks' attention),
    the same outputs, with SDPA's inputs rebuilt in the backward pass instead of kept (module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        projections = [attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)]
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            projections += [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                            attn.add_v_proj(encoder_hidden_states)]
        else:
            projections += [None, None, None]
        out = _checkpointed(_flux_attention, attn, *projections, image_rotary_emb, attention_mask)
        if encoder_hidden_states is None:  # single-stream blocks: their own projection follows, outside attention
            return out
        context_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                                 out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context_out.contiguous())


def _wan_rotary(x, freqs_cos, freqs_sin):
    """Wan's rotary embedding (interleaved pairs), as WanAttnProcessor applies it inline."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _wan_attention(attn, query, key, value, rotary, image_key, image_value, attention_mask):
    """diffusers' WanAttnProcessor from the projections' outputs to the attention's output: Wan normalises q and k
    across heads (before the head split); I2V adds attention over the image embedding's keys and values."""
    def heads(x):
        return x.unflatten(2, (attn.heads, -1))

    query, key, value = heads(attn.norm_q(query)), heads(attn.norm_k(key)), heads(value)
    if rotary is not None:
        query, key = _wan_rotary(query, *rotary), _wan_rotary(key, *rotary)
    out = _sdpa(query, key, value, attention_mask).type_as(query)
    if image_key is not None:
        image_out = _sdpa(query, heads(attn.norm_added_k(image_key)), heads(image_value)).type_as(query)
        out = out + image_out
    return out


class RecomputedInputsWanAttnProcessor:
    """diffusers' WanAttnProcessor (Wan 2.1 / 2.2: self-attention with rotary embeddings, cross-attention to the
    text, I2V's image keys and values), the same outputs, with SDPA's inputs rebuilt in the backward pass instead
    of kept (module docstring)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        image_key = image_value = None
        if attn.add_k_proj is not None:
            # As diffusers: the text encoder's 512 tokens come last, the image embedding's tokens before them.
            image_tokens = encoder_hidden_states.shape[1] - 512
            image_states, encoder_hidden_states = (encoder_hidden_states[:, :image_tokens],
                                                   encoder_hidden_states[:, image_tokens:])
            image_key, image_value = attn.add_k_proj(image_states), attn.add_v_proj(image_states)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        projections = [attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)]
        out = _checkpointed(_wan_attention, attn, *projections, rotary_emb, image_key, image_value, attention_mask)
        return attn.to_out[1](attn.to_out[0](out))


def _replacements() -> dict[type, type]:
    """diffusers processor class -> the processor that stands in for it (exact classes: a subclass may differ)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return {JointAttnProcessor2_0: RecomputedInputsJointAttnProcessor, FluxAttnProcessor: RecomputedInputsFluxAttnProcessor,
            WanAttnProcessor: RecomputedInputsWanAttnProcessor}


def recompute_attention_inputs(model: torch.nn.Module) -> int:
    """Give every attention module of an SD3 / SD3.5, FLUX or Wan transformer the processor that stands in for its
    diffusers processor (table in the module docstring); returns how many. Other processors (the UNet's, IP-Adapter
    and fused-projection ones) are refused by name: their math differs."""
    replacements = _replacements()
    ours = set(replacements.values())
    modules = [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
    others = sorted({type(m.processor).__name__ for m in modules
                     if type(m.processor) not in replacements and type(m.processor) not in ours})
    fused = sorted({type(m).__name__ for m in modules if getattr(m, "fused_projections", False)})
    if not modules or others or fused:
        found = (f"fused q / k / v projections in {', '.join(fused)}" if fused and not others
                 else ", ".join(others) or "no diffusers attention modules")
        raise ConfigError(f"config key 'recompute_attention_inputs': for the attention processors of SD3 / SD3.5, "
                          f"FLUX and Wan ({', '.join(c.__name__ for c in replacements)}); {type(model).__name__} "
                          f"has {found}")
    for m in modules:
        if type(m.processor) not in ours:
            m.set_processor(replacements[type(m.processor)]())
    return len(modules)
