"""genalign.models.attention: diffusion transformers' attention with SDPA's inputs rebuilt in the backward pass."""
import copy

import pytest
import torch

from genalign.config import ConfigError
from genalign.models.attention import (
    RecomputedInputsFluxAttnProcessor,
    RecomputedInputsJointAttnProcessor,
    RecomputedInputsWanAttnProcessor,
    recompute_attention_inputs,
)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def with_lora(model):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    return model


def sd35_like():
    """SD3.5's design at a tiny size: RMS-normed q / k and one dual-attention (joint + image-only) block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                  qk_norm="rms_norm", dual_attention_layers=(0,))
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(3, 4, 16, 16, generator=g),
              "encoder_hidden_states": torch.randn(3, 7, 32, generator=g),
              "pooled_projections": torch.randn(3, 32, generator=g), "timestep": torch.tensor([900.0, 500.0, 100.0])}
    return with_lora(model), inputs


def flux_like():
    """FLUX.1's design at a tiny size: one double-stream and one single-stream block, rotary embeddings."""
    from genalign.models import tiny

    model = tiny.tiny_flux_pipeline().transformer
    g = torch.Generator().manual_seed(1)
    image_tokens, text_tokens = 256, 5
    inputs = {"hidden_states": torch.randn(3, image_tokens, 16, generator=g),
              "encoder_hidden_states": torch.randn(3, text_tokens, 32, generator=g),
              "pooled_projections": torch.randn(3, 32, generator=g), "timestep": torch.tensor([0.9, 0.5, 0.1]),
              "img_ids": torch.randn(image_tokens, 3, generator=g), "txt_ids": torch.zeros(text_tokens, 3)}
    return with_lora(model), inputs


def wan_like(i2v: bool = False):
    """Wan 2.1's design at a tiny size: self-attention with rotary embeddings and q / k normed across heads,
    cross-attention to the text; `i2v`: the image-to-video model's extra image keys and values (diffusers takes the
    last 512 text tokens as the text, the tokens before them as the image embedding's)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                  **({"image_dim": 8, "added_kv_proj_dim": 24} if i2v else {}))
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 4, 4, 16, 16, generator=g), "timestep": torch.tensor([900, 100]),
              "encoder_hidden_states": torch.randn(2, 512 if i2v else 7, 32, generator=g)}
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(2, 3, 8, generator=g)
    return with_lora(model), inputs


# family -> (builder, the processor it gets, attention modules: SD3.5 two joint + one image-only; FLUX one
# double-stream + one single-stream; Wan a self- and a cross-attention per block)
FAMILIES = {
    "sd35": (sd35_like, RecomputedInputsJointAttnProcessor, 3),
    "flux": (flux_like, RecomputedInputsFluxAttnProcessor, 2),
    "wan": (wan_like, RecomputedInputsWanAttnProcessor, 4),
    "wan-i2v": (lambda: wan_like(i2v=True), RecomputedInputsWanAttnProcessor, 4),
}


def forward_kept_bytes_and_sdpa_qk_bytes(model, inputs):
    """The output; the bytes of tensor memory the forward pass leaves allocated (its output and what it keeps for
    the backward), from the allocations torch's CPU allocator reports to the profiler; and the bytes of the
    distinct q and k tensors handed to SDPA (what SDPA keeps for its backward)."""
    from torch.profiler import ProfilerActivity, profile

    sdpa = torch.nn.functional.scaled_dot_product_attention
    qk_storages = {}

    def recording_sdpa(*args, **kwargs):
        for x in (args[:2] if len(args) >= 2 else (kwargs["query"], kwargs["key"])):
            qk_storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return sdpa(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording_sdpa  # diffusers looks it up at call time
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(**inputs).sample
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    kept = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return out, kept, sum(qk_storages.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_outputs_and_gradients_and_less_kept_for_the_backward(family):
    build, processor, attentions = FAMILIES[family]
    plain, inputs = build()
    lean = copy.deepcopy(plain)
    modules = [m for m in lean.modules() if hasattr(m, "set_processor")]
    assert recompute_attention_inputs(lean) == len(modules) == attentions
    assert all(type(m.processor) is processor for m in modules)

    out_plain, kept_plain, sdpa_qk = forward_kept_bytes_and_sdpa_qk_bytes(plain, inputs)
    out_lean, kept_lean, _ = forward_kept_bytes_and_sdpa_qk_bytes(lean, inputs)
    torch.testing.assert_close(out_lean, out_plain, rtol=0, atol=1e-6)
    out_plain.square().mean().backward()
    out_lean.square().mean().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert len(grads) == 8 * attentions - 2 * (family == "flux")  # FLUX's single-stream attention has no to_out
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in lean.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)

    # What SDPA no longer keeps: its normalised (rotated, concatenated) q and k. Measured 80% of their bytes
    # (Wan) to 103% (FLUX: its eager rotary embedding keeps a little more than SDPA's inputs).
    assert 0.75 * sdpa_qk <= kept_plain - kept_lean <= 1.1 * sdpa_qk

    # No-grad calls (a reference forward) take the plain path: the same output
    with torch.no_grad():
        torch.testing.assert_close(lean(**inputs).sample, out_plain.detach(), rtol=0, atol=1e-6)


def test_other_attention_processors_are_refused_by_name():
    from genalign.models import tiny

    unet = tiny.tiny_unet_pipeline().unet
    with pytest.raises(ConfigError, match="recompute_attention_inputs.*UNet2DConditionModel has AttnProcessor2_0"):
        recompute_attention_inputs(unet)
    fused, _ = flux_like()
    fused.fuse_qkv_projections()
    with pytest.raises(ConfigError, match="fused q / k / v projections in FluxAttention"):
        recompute_attention_inputs(fused)
    with pytest.raises(ConfigError, match="no diffusers attention modules"):
        recompute_attention_inputs(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_on_sdpas_math_path_the_attention_is_kept_not_redone(family):
    """SDPA's fallback (and what torch's FLOP counter forces) is its math path, matmuls and a softmax: the
    processors keep those too, so the backward redoes no attention arithmetic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    plain, inputs = FAMILIES[family][0]()
    lean = copy.deepcopy(plain)
    recompute_attention_inputs(lean)
    flops = []
    for model in (plain, lean):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(**inputs).sample.square().mean().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0
