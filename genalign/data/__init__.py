"""Data for genalign: preference pairs, prompts, and latent / text-embedding caches.

    from genalign.data import load_preference_pairs, load_prompts, build_cache, load_cache

`load_preference_pairs` reads Pick-a-Pic parquet / HF datasets, VideoAlign CSV, jsonl and folder layouts
(formats, tie policies and the bad-row policy are documented in `genalign.data.preference`); `build_cache` /
`load_cache` write and check latent caches (`genalign.data.cache`). Counts and skipped rows are logged on the
"genalign.data" logger. Importing this package is light: pyarrow, datasets, imageio, safetensors and tqdm are
imported only when a function needs them.
"""

from .cache import (
    CachedPreferenceDataset,
    build_cache,
    cache_main,
    dtype_name,
    load_cache,
    load_cache_source,
    model_fingerprint,
    parse_resolution,
    read_manifest,
)
from .errors import CacheMismatchError, DataError
from .media import MediaItem, decode_image, read_video, resize_center_crop, sample_frames, to_pixels
from .preference import (
    DEFAULT_DIMS,
    TIE_POLICIES,
    PreferenceDataset,
    PreferencePair,
    collate_pairs,
    load_preference_pairs,
)
from .prompts import PromptDataset, PromptRecord, load_prompts, read_prompts

__all__ = [
    "DEFAULT_DIMS",
    "TIE_POLICIES",
    "CacheMismatchError",
    "CachedPreferenceDataset",
    "DataError",
    "MediaItem",
    "PreferenceDataset",
    "PreferencePair",
    "PromptDataset",
    "PromptRecord",
    "build_cache",
    "cache_main",
    "collate_pairs",
    "decode_image",
    "dtype_name",
    "load_cache",
    "load_cache_source",
    "load_preference_pairs",
    "load_prompts",
    "model_fingerprint",
    "parse_resolution",
    "read_manifest",
    "read_prompts",
    "read_video",
    "resize_center_crop",
    "sample_frames",
    "to_pixels",
]
