"""genalign.models.attention: SD3's joint attention with SDPA's inputs rebuilt in the backward pass."""
import copy

import pytest
import torch

from genalign.config import ConfigError
from genalign.models.attention import RecomputedInputsJointAttnProcessor, recompute_attention_inputs


def sd35_like_transformer():
    """SD3.5's design at a tiny size: RMS-normed q / k and one dual-attention (joint + image-only) block."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                  qk_norm="rms_norm", dual_attention_layers=(0,))
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return model


def inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 7, 32, generator=g),
            torch.randn(batch, 32, generator=g), torch.tensor([900.0, 500.0, 100.0][:batch]))


def forward_and_kept_bytes(model):
    """The output, and the bytes of tensor memory the forward pass leaves allocated (its output and what it keeps
    for the backward), from the allocations torch's CPU allocator reports to the profiler."""
    from torch.profiler import ProfilerActivity, profile

    x, text, pooled, t = inputs()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x, text, pooled, t).sample
    kept = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return out, kept


def test_same_outputs_and_gradients_and_less_kept_for_the_backward():
    plain = sd35_like_transformer()
    lean = copy.deepcopy(plain)
    attentions = [m for m in lean.modules() if hasattr(m, "set_processor")]
    assert recompute_attention_inputs(lean) == len(attentions) == 3  # two joint, one image-only
    assert all(isinstance(m.processor, RecomputedInputsJointAttnProcessor) for m in attentions)

    out_plain, kept_plain = forward_and_kept_bytes(plain)
    out_lean, kept_lean = forward_and_kept_bytes(lean)
    torch.testing.assert_close(out_lean, out_plain, rtol=0, atol=1e-6)
    out_plain.square().mean().backward()
    out_lean.square().mean().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert len(grads) == 24 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in lean.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)

    # What SDPA no longer keeps: its normalised, concatenated q and k (float32, batch x tokens x width) of each
    # attention: 64 image tokens + 7 text tokens for the two joint ones, 64 image tokens for the image-only one.
    # Less a little: the checkpointed region keeps all its inputs, the projections (measured: 89.5% of it).
    width = 16
    saved_qk = 2 * 4 * 3 * width * (2 * (64 + 7) + 64)
    assert 0.85 * saved_qk <= kept_plain - kept_lean <= saved_qk

    # No-grad calls (a reference forward) take the plain path: the same output
    with torch.no_grad():
        x, text, pooled, t = inputs()
        torch.testing.assert_close(lean(x, text, pooled, t).sample, out_plain.detach(), rtol=0, atol=1e-6)


def test_other_attention_processors_are_refused_by_name():
    from genalign.models import tiny

    flux = tiny.tiny_flux_pipeline().transformer
    with pytest.raises(ConfigError, match="recompute_attention_inputs.*FluxTransformer2DModel has Flux"):
        recompute_attention_inputs(flux)
    with pytest.raises(ConfigError, match="no diffusers attention modules"):
        recompute_attention_inputs(torch.nn.Linear(2, 2))


def test_on_sdpas_math_path_the_attention_is_kept_not_redone():
    """SDPA's fallback (and what torch's FLOP counter forces) is its math path, matmuls and a softmax: the
    processor keeps those too, so the backward redoes no attention arithmetic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    plain = sd35_like_transformer()
    lean = copy.deepcopy(plain)
    recompute_attention_inputs(lean)
    flops = []
    for model in (plain, lean):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(*inputs()).sample.square().mean().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0
