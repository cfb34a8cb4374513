"""Saved weights are readable as the umask says, not only by their owner (safetensors >= 0.8 writes 0600 files:
genalign.files), and folders are published atomically."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from genalign.files import current_umask, publish_copy, publish_dir, share_like_umask, shared_as_written

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_mode & 0o777 for f in sorted(folder.rglob("*")) if f.is_file()}


def test_current_umask_reads_the_process_umask_without_changing_it():
    for mask in (0o022, 0o027, 0o077):
        with umask(mask):
            assert current_umask() == mask
            assert current_umask() == mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_publish_dir_gives_every_file_the_umask_mode_and_replaces_the_old_folder(tmp_path, mask):
    with umask(mask) as want:
        tmp, final = tmp_path / ".tmp-final", tmp_path / "final"
        (tmp / "sub").mkdir(parents=True)
        save_file({"w": torch.arange(3.0)}, str(tmp / "sub" / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
        final.mkdir()
        (final / "stale.txt").write_text("from the run before")
        publish_dir(tmp, final)
    assert not tmp.exists() and not (final / "stale.txt").exists()
    assert modes(final) == {"config.json": want, "sub/model.safetensors": want}
    assert torch.equal(load_file(str(final / "sub" / "model.safetensors"))["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no .trash- folder left behind


def test_publish_copy_leaves_the_source_and_shares_the_copy(tmp_path):
    src = tmp_path / "run" / "reward_model"
    src.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(src / "model.safetensors"))
    with umask(0o022) as want:
        publish_copy(src, tmp_path / "assets" / "reward")
    assert (src / "model.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors wrote, untouched
    assert modes(tmp_path / "assets" / "reward") == {"model.safetensors": want}


def test_shared_as_written_changes_only_the_files_the_block_wrote(tmp_path):
    (tmp_path / "private.key").write_text("secret")
    os.chmod(tmp_path / "private.key", 0o600)
    save_file({"w": torch.ones(1)}, str(tmp_path / "old.safetensors"))  # 0600, written before the block
    with umask(0o022) as want, shared_as_written(tmp_path):
        save_file({"w": torch.zeros(1)}, str(tmp_path / "new.safetensors"))
        save_file({"w": torch.zeros(1)}, str(tmp_path / "old.safetensors"))  # replaced: a new file
    assert modes(tmp_path) == {"new.safetensors": want, "old.safetensors": want, "private.key": 0o600}


def test_share_like_umask_on_one_file(tmp_path):
    save_file({"w": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with umask(0o002) as want:
        share_like_umask(tmp_path / "x.safetensors")
    assert modes(tmp_path) == {"x.safetensors": want}


def test_saved_reward_models_latent_rewards_and_pipelines_are_readable_by_the_group(tmp_path):
    """The save paths users call directly: reward models (both kinds), the Flow-NRG latent reward, pipelines,
    an adapter's LoRA."""
    from genalign.pipelines import RLGStableDiffusion3Pipeline
    from genalign.rewards import tiny_clip_reward, tiny_video_reward

    from genalign.guidance.latent_reward import LatentRewardConfig, LatentRewardModel
    from genalign.models import SD3Adapter
    from genalign.models.tiny import tiny_sd3_pipeline

    with umask(0o027) as want:
        folders = [tiny_clip_reward().save_pretrained(tmp_path / "clip"),
                   tiny_video_reward().save_pretrained(tmp_path / "video")]
        LatentRewardModel(LatentRewardConfig(latent_space="test", latent_shape=(4, 8, 8), hidden=8, depth=1)).save_pretrained(
            tmp_path / "latent")
        pipe = RLGStableDiffusion3Pipeline(**tiny_sd3_pipeline(with_t5=False).components)
        pipe.save_pretrained(tmp_path / "pipe")
        adapter = SD3Adapter(pipe)
        adapter.add_lora()
        adapter.save_lora(tmp_path / "lora")
    for folder in [*folders, tmp_path / "latent", tmp_path / "pipe", tmp_path / "lora"]:
        found = modes(folder)
        assert any(name.endswith(".safetensors") for name in found), folder
        assert set(found.values()) == {want}, (folder, found)
