"""The world's video base model: a WanPipeline over the per-frame image autoencoder (see video_vae.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..models.tiny import t5_text_encoder, wan_transformer
from . import DEFAULT_SAMPLING
from .build import BuildConfig, encode_raw, load_autoencoder, pretrain_flow, save_pipeline
from .corpus import make_video_corpus
from .tokenizer import MAX_LENGTH, build_tokenizer

VIDEO_TEXT_DIM = 32
VIDEO_PATCH = (1, 4, 4)


def video_transformer(seed: int):
    return wan_transformer(seed, patch_size=VIDEO_PATCH, num_attention_heads=4, attention_head_dim=32, freq_dim=64,
                           ffn_dim=256, num_layers=3, rope_max_seq_len=64, text_dim=VIDEO_TEXT_DIM)


def video_pipeline(seed: int, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tok = build_tokenizer()
    return WanPipeline(
        tokenizer=tok,
        text_encoder=t5_text_encoder(tok, seed + 3, d_model=VIDEO_TEXT_DIM, umt5=True),
        transformer=video_transformer(seed),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )


def build_video_model(out: Path, vae_dir: Path, cfg: BuildConfig) -> dict:
    from ..models.wan import WanAdapter
    from .video_vae import FramewiseAutoencoderKL

    stats: dict = {}
    t0 = time.time()
    corpus = make_video_corpus(cfg.video_corpus, seed=cfg.seed + 1)
    stats["corpus_s"] = time.time() - t0
    image_vae = load_autoencoder(vae_dir)
    raw = encode_raw(image_vae, corpus.media)  # (N, C, F, h, w)
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4))
    vae = FramewiseAutoencoderKL.from_image_vae(image_vae, mean.tolist(), std.tolist())
    pipe = video_pipeline(cfg.seed, vae)
    adapter = WanAdapter(pipe, max_sequence_length=MAX_LENGTH)
    latents = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    t0 = time.time()
    losses = pretrain_flow(adapter, latents, corpus.captions, cfg.video_steps, cfg.batch_size // 2, cfg.lr, cfg.seed,
                           cfg.cfg_dropout, cfg.ema_decay, "world: video model")
    stats["seconds"], stats["final_loss"] = time.time() - t0, float(np.mean(losses[-100:]))
    save_pipeline(pipe, out, {**DEFAULT_SAMPLING["video"], "max_sequence_length": MAX_LENGTH})
    return stats
