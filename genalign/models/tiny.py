"""Tiny random-init pipelines of every supported family, built offline in well under a second.

For tests and examples only: the configs are the small ones measured in ENVIRONMENT.md, the tokenizers are
word-level ones built from the world's vocabulary with the `tokenizers` library (never fetched from a hub),
and every model is put in eval mode (a fresh T5 is in train mode, and its dropout makes outputs differ run to run).
The VAEs get non-trivial latent normalisation constants (scaling/shift factors, per-channel mean/std) so that
tests of the normalisation can fail.
"""

from __future__ import annotations

import copy

import torch

TEXT_DIM = 32
T5_MAX_LENGTH = 16


def clip_tokenizer():
    """A CLIP-slot tokenizer: the world's word-level tokenizer (bos/eos around the words, 16 tokens)."""
    from ..world.tokenizer import build_tokenizer

    return build_tokenizer()


def t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5/UMT5-slot tokenizer built offline like T5's: pad = 0, eos '</s>' appended, no bos."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..world.grammar import VOCABULARY

    special = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(special + list(VOCABULARY))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=max_length
    )


def clip_text_encoder(tok, seed: int, hidden_size: int = TEXT_DIM, projection_dim: int | None = TEXT_DIM):
    """CLIPTextModelWithProjection (projection_dim given) or CLIPTextModel (None), 2 layers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection_dim or hidden_size,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)
    return model.eval()


def t5_text_encoder(tok, seed: int, d_model: int = TEXT_DIM, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kw = {
        "vocab_size": len(tok),
        "d_model": d_model,
        "d_kv": 16,
        "d_ff": 2 * d_model,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "dropout_rate": 0.0,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "decoder_start_token_id": tok.pad_token_id,
    }
    model = UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))
    return model.eval()


def autoencoder_kl(seed: int, latent_channels: int = 4, scaling_factor: float = 0.8, shift_factor: float | None = None,
                   block_out_channels: tuple[int, int] = (8, 16), norm_num_groups: int = 4):
    """AutoencoderKL with a spatial factor of 2 (two blocks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True):
    """StableDiffusion3Pipeline: two CLIP encoders (+ T5 unless with_t5=False, as in the world's image model)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = clip_tokenizer()
    joint_dim = 2 * TEXT_DIM  # the two CLIP hidden states side by side; T5's width must match
    transformer = sd3_transformer(seed)
    t5_tok = t5_tokenizer() if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=autoencoder_kl(seed + 1, scaling_factor=1.5, shift_factor=0.1),
        text_encoder=clip_text_encoder(tok, seed + 2),
        tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok, seed + 3),
        tokenizer_2=copy.deepcopy(tok),
        text_encoder_3=t5_text_encoder(t5_tok, seed + 4, d_model=joint_dim) if with_t5 else None,
        tokenizer_3=t5_tok,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    """FluxPipeline (CLIP pooled + T5), dynamic (resolution-dependent) shift as FLUX.1's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    latent_channels = 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    vae = autoencoder_kl(seed + 1, latent_channels, scaling_factor=1.3, shift_factor=0.2)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_text_encoder(tok, seed + 2, projection_dim=None),
        tokenizer=tok,
        text_encoder_2=t5_text_encoder(t5_tok, seed + 3),
        tokenizer_2=t5_tok,
    )


def sd3_transformer(seed: int, num_layers: int = 2, attention_head_dim: int = 8, num_attention_heads: int = 2,
                    text_dim: int = TEXT_DIM):
    """SD3Transformer2DModel over 4x16x16 latents, conditioned on two CLIP encoders of width text_dim (no T5 width
    of its own). The world's image model is the same design at a larger size."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=2 * text_dim,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=2 * text_dim,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def wan_transformer(seed: int, patch_size: tuple[int, int, int] = (1, 2, 2), num_attention_heads: int = 2,
                    attention_head_dim: int = 12, freq_dim: int = 32, ffn_dim: int = 32, num_layers: int = 2,
                    rope_max_seq_len: int = 32, text_dim: int = TEXT_DIM):
    """WanTransformer3DModel with 4 latent channels; the world's video model is the same design at a larger size."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=patch_size,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=rope_max_seq_len,
    ).eval()


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False, expand_timesteps: bool = False):
    """WanPipeline: UMT5 encoder, AutoencoderKLWan (x4 temporal, x8 spatial), flow-match Euler. Wan 2.1 layout by
    default; two_experts: Wan 2.2 A14B's high/low-noise transformers split at boundary_ratio 0.5;
    expand_timesteps: Wan 2.2 TI2V's per-token timesteps."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    t5_tok = t5_tokenizer()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    ).eval()
    return WanPipeline(
        tokenizer=t5_tok,
        text_encoder=t5_text_encoder(t5_tok, seed + 2, umt5=True),
        transformer=wan_transformer(seed),
        transformer_2=wan_transformer(seed + 3) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
        expand_timesteps=expand_timesteps,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def tiny_unet_pipeline(seed: int = 0, sdxl: bool = False, prediction_type: str = "epsilon"):
    """StableDiffusionPipeline (SD1.5 layout) or StableDiffusionXLPipeline (sdxl=True), EulerDiscreteScheduler
    with SD's scaled-linear betas and "leading" spacing."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    tok = clip_tokenizer()
    time_embed_dim = 8
    unet_kw = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": (2, 4),
        "cross_attention_dim": 2 * TEXT_DIM if sdxl else TEXT_DIM,
    }
    if sdxl:  # micro-conditioning: pooled text (TEXT_DIM) + 6 size/crop numbers embedded in time_embed_dim each
        unet_kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_embed_dim,
            use_linear_projection=True,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kw).eval()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1, prediction_type=prediction_type,
    )
    vae = autoencoder_kl(seed + 1, scaling_factor=0.6)
    if sdxl:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=clip_text_encoder(tok, seed + 2, projection_dim=None),
            text_encoder_2=clip_text_encoder(tok, seed + 3),
            tokenizer=tok,
            tokenizer_2=copy.deepcopy(tok),
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=clip_text_encoder(tok, seed + 2, projection_dim=None),
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
