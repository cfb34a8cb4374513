"""`genalign demo`: a Gradio page that shows the base model and the aligned one side by side.

    genalign demo [--port 7860]                                   # the world's image model + its shipped Flow-DPO LoRA
    genalign demo --model PIPELINE --lora RUN/lora [--lora ...] [--reward REWARD] [--nrg-reward LATENT_REWARD]
    python -m genalign.app ...                                    # the same

For one prompt and seed the page samples twice from the same initial noise: the base model with CFG (every LoRA
switched off) and the RLG combination at the chosen weight w (`genalign.guidance.rlg_combiner`, plus Flow-NRG when
a latent reward model is loaded), and scores both with the learned reward (--reward) and, for the world's models
and prompts of its language, the world's oracle (VQ / TA, and MQ for videos). The sampling goes through the same
functions as `genalign sample --lora DIR --rlg-scale W` (`genalign.cli.load_model`, `guidance_combiner`), so
w = 0 gives exactly the base image and the demo's base image equals `genalign sample`'s for the same seed.

Server behaviour: the model is loaded once at startup and stays resident. Requests go through Gradio's queue
(--concurrency workers, default 1; at most --max-queue waiting, default 64); the two samplings of a request hold
one lock, because the LoRA on/off state of the shared network is switched per pass (a second worker only
overlaps validation, scoring and image encoding). Every input is checked by `validate_request` before any
sampling; a bad value is refused with one sentence shown on the page (a `gr.Error`; gradio_client raises it as
an exception carrying the same text):

    Enter a prompt: the prompt is empty.
    The prompt is N characters long; at most 300 are allowed.
    Steps must be a whole number from 1 to 100, got 1000.
    Seed must be a whole number from 0 to 4294967295, got -1.
    CFG must be a number from 0 to 20, got 25.
    RLG weight w must be a number from 0 to 3, got 5 (0 = the base model, 1 = the aligned model, above 1 extrapolates).
    Height must be a multiple of 16 from 16 to MAX, got 50.         (Width, Frames likewise)
    Expert weight 'NAME' must be a number from 0 to 1, got ...; NRG weight 'VQ' ...; NRG scale ... from 0 to 10

It listens on 127.0.0.1 only, `--share` is off unless asked, and Gradio's analytics are off (no lookups off this
machine). Gradio is imported when the page is built, not by `import genalign.app`.
"""

from __future__ import annotations

import argparse
import atexit
import html
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RLG_W_RANGE = (0.0, 3.0)  # genalign.guidance.RLG_WEIGHT_RANGE (checked equal in the tests; not imported: no torch here)
DISPLAY_SIZE = 256  # 32x32 world samples are shown 8x larger, nearest-neighbour
DEFAULT_PORT = 7860
CSS = "#base img, #aligned img, #base video, #aligned video { image-rendering: pixelated; }"
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DO_NOT_TRACK": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class DemoInputError(ValueError):
    """A request the demo refuses (shown on the page as one sentence)."""


# ------------------------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class Limits:
    """What a request may ask for. The size limit depends on the model (`DemoModel` sets it)."""

    max_prompt_chars: int = 300
    max_steps: int = 100
    max_seed: int = 2**32 - 1
    max_cfg: float = 20.0
    w_range: tuple[float, float] = RLG_W_RANGE
    size_multiple: int = 16
    min_size: int = 16
    max_size: int = 1024
    max_frames: int = 64
    max_nrg_scale: float = 10.0


@dataclass
class Request:
    prompt: str
    seed: int
    steps: int
    cfg: float
    w: float
    height: int
    width: int
    num_frames: int | None = None
    expert_weights: dict[str, float] = field(default_factory=dict)  # relative shares of the LoRA experts
    nrg_weights: dict[str, float] = field(default_factory=dict)
    nrg_scale: float = 0.0


def _fmt(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) and abs(x) < 1e15 else f"{x:g}"


def _number(label: str, value, lo: float, hi: float, *, integer: bool = False, hint: str = "") -> float | int:
    kind = "a whole number" if integer else "a number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{label} must be {kind} from {_fmt(lo)} to {_fmt(hi)}, got {value!r}{hint}.") from None
    if not math.isfinite(x) or not lo <= x <= hi or (integer and x != int(x)):
        raise DemoInputError(f"{label} must be {kind} from {_fmt(lo)} to {_fmt(hi)}, got {_fmt(x)}{hint}.")
    return int(x) if integer else x


def _size(label: str, value, limits: Limits) -> int:
    m = limits.size_multiple
    msg = f"{label} must be a multiple of {m} from {limits.min_size} to {limits.max_size}, got {value!r}."
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(msg) from None
    if not math.isfinite(x) or x != int(x) or not limits.min_size <= x <= limits.max_size or int(x) % m:
        raise DemoInputError(msg.replace(repr(value), _fmt(x)))
    return int(x)


def validate_request(limits: Limits, prompt, seed, steps, cfg, w, *, height, width, num_frames=None,
                     expert_weights: dict | None = None, nrg_weights: dict | None = None,
                     nrg_scale=0.0) -> Request:
    """Check every input of a request against `limits`; raises DemoInputError with one sentence naming the control,
    the allowed range and the value given."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoInputError("Enter a prompt: the prompt is empty.")
    prompt = prompt.strip()
    if len(prompt) > limits.max_prompt_chars:
        raise DemoInputError(f"The prompt is {len(prompt)} characters long; at most {limits.max_prompt_chars} are "
                             "allowed.")
    lo, hi = limits.w_range
    req = Request(
        prompt=prompt,
        seed=_number("Seed", seed, 0, limits.max_seed, integer=True),
        steps=_number("Steps", steps, 1, limits.max_steps, integer=True),
        cfg=_number("CFG", cfg, 0, limits.max_cfg),
        w=_number("RLG weight w", w, lo, hi,
                  hint=" (0 = the base model, 1 = the aligned model, above 1 extrapolates)"),
        height=_size("Height", height, limits),
        width=_size("Width", width, limits),
        num_frames=None if num_frames is None else _number("Frames", num_frames, 1, limits.max_frames, integer=True),
        expert_weights={k: _number(f"Expert weight {k!r}", v, 0, 1) for k, v in (expert_weights or {}).items()},
        nrg_weights={k: _number(f"NRG weight {k!r}", v, 0, 1) for k, v in (nrg_weights or {}).items()},
        nrg_scale=_number("NRG scale", nrg_scale, 0, limits.max_nrg_scale),
    )
    if len(req.expert_weights) > 1 and req.w > 0 and sum(req.expert_weights.values()) == 0:
        raise DemoInputError("Set at least one expert weight above 0 (or w = 0 for the base model).")
    return req


def rlg_expert_weights(w: float, shares: dict[str, float]) -> dict[str, float]:
    """Per-expert RLG weights w_k = w * s_k / sum(s): the sliders set each LoRA's share, w the overall scale
    (so w = 1 is a mixture of the fine-tuned models and w = 0 the base, whatever the shares)."""
    total = sum(shares.values())
    return {k: (w * s / total if total > 0 else 0.0) for k, s in shares.items()}


# ------------------------------------------------------------------------------------------------ the model
def lora_training_beta(lora: str | os.PathLike) -> tuple[float, str] | None:
    """(beta, beta_schedule) of the run that trained a LoRA: the trainer writes config.yaml in the run folder and
    the LoRA to `<run>/lora` (checkpoints: `<run>/checkpoint-N/{config.yaml,lora}`). None when not found."""
    import yaml

    for folder in (Path(lora), Path(lora).parent):
        f = folder / "config.yaml"
        if f.is_file():
            try:
                cfg = yaml.safe_load(f.read_text())
            except yaml.YAMLError:
                return None
            if isinstance(cfg, dict) and isinstance(cfg.get("beta"), (int, float)):
                return float(cfg["beta"]), str(cfg.get("beta_schedule") or "constant")
    return None


@dataclass
class Result:
    base: object  # uint8 (H, W, 3) or (F, H, W, 3)
    aligned: object
    base_scores: dict
    aligned_scores: dict
    seconds: float


class DemoModel:
    """The resident model: the adapter with its LoRA(s), the optional reward models, the limits and a lock."""

    def __init__(self, adapter, defaults: dict, path: str, lora_paths: list[str], lora_names: list[str],
                 reward=None, nrg_reward=None, fps: int = 8):
        from genalign.cli import _is_world_model

        self.adapter, self.defaults, self.path = adapter, dict(defaults), str(path)
        self.lora_paths, self.lora_names = list(lora_paths), list(lora_names)
        self.reward, self.nrg_reward, self.fps = reward, nrg_reward, fps
        self.is_video = bool(adapter.is_video)
        self.is_world = _is_world_model(self.path)
        self.betas = {n: lora_training_beta(p) for n, p in zip(self.lora_names, self.lora_paths)}
        self.nrg_dims = tuple(nrg_reward.dims) if nrg_reward is not None else ()
        self.limits = Limits(max_size=self._max_size())
        self.lock = threading.Lock()
        self._tmp: Path | None = None

    @classmethod
    def load(cls, model: str | None = None, loras: list[str] | None = None, reward: str | None = None,
             nrg_reward: str | None = None) -> DemoModel:
        """Load once. model None: the world's image model. With a world model, loras / reward / nrg_reward None
        mean the ones shipped with it (when shipped); loras [] = no LoRA. Raises the CLI's user errors."""
        from genalign.cli import load_model
        from genalign.models.base import ModelLoadError
        from genalign.world import (
            WORLD_MODEL_NAMES,
            WorldModelMissing,
            aligned_lora_path,
            latent_reward_path,
            reward_model_path,
        )

        if model is None or model in WORLD_MODEL_NAMES:
            # A world model comes with what the world build shipped for it: the aligned LoRA, the learned reward
            # (scores only) and the noise-aware latent reward (NRG sliders; its scale starts at 0).
            kind = WORLD_MODEL_NAMES.get(model or "world") or "image"
            shipped = {"loras": lambda: [str(aligned_lora_path(kind))], "reward": lambda: str(reward_model_path(kind)),
                       "nrg_reward": lambda: str(latent_reward_path(kind))}
            given = {"loras": loras, "reward": reward, "nrg_reward": nrg_reward}
            for key, find in shipped.items():
                if given[key] is None:
                    try:
                        given[key] = find()
                    except WorldModelMissing:
                        pass
            loras, reward, nrg_reward = given["loras"], given["reward"], given["nrg_reward"]
        loras = loras or []
        for flag, p in (("--reward", reward), ("--nrg-reward", nrg_reward)):
            if p is not None and not Path(p).is_dir():
                raise ModelLoadError(f"{flag} {p!r} is not a folder")
        adapter, defaults, path, names = load_model(model, None, loras)
        reward_model = None
        if reward is not None:
            from genalign.rewards import load_reward_model
            from genalign.rewards.base import RewardLoadError

            try:
                reward_model = load_reward_model(reward)
            except RewardLoadError as e:
                raise ModelLoadError(str(e)) from e
        latent_reward = None
        if nrg_reward is not None:
            from genalign.guidance import LatentRewardModel, check_compatible, latent_space_id

            latent_reward = LatentRewardModel.from_pretrained(nrg_reward)
            d = cls._sampling_defaults(adapter, defaults)
            check_compatible(latent_reward, latent_space_id(adapter),
                             adapter.latent_shape(d["height"], d["width"], d.get("num_frames")))
        return cls(adapter, defaults, path, loras, names, reward_model, latent_reward)

    @staticmethod
    def _sampling_defaults(adapter, defaults: dict) -> dict:
        d = {"num_steps": int(defaults.get("num_steps", 28)), "guidance_scale": float(defaults.get("guidance_scale", 4.5)),
             "height": int(defaults.get("height", 512)), "width": int(defaults.get("width", 512))}
        if adapter.is_video:
            d["num_frames"] = int(defaults.get("num_frames", 17))
        return d

    @property
    def sampling_defaults(self) -> dict:
        return self._sampling_defaults(self.adapter, self.defaults)

    def _max_size(self) -> int:
        """SD3-style transformers cap the latent grid (pos_embed_max_size); otherwise 1024 px."""
        cfg = getattr(self.adapter.denoiser, "config", {})
        cap = cfg.get("pos_embed_max_size") if hasattr(cfg, "get") else None
        if cap and not self.is_video:
            patch = cfg.get("patch_size", 1) or 1
            return min(1024, int(cap) * int(patch) * int(self.adapter.pipe.vae_scale_factor))
        return 1024

    # ---------------------------------------------------------------------------------------- requests
    def validate(self, prompt, seed, steps, cfg, w, height, width, num_frames=None, expert_weights=None,
                 nrg_weights=None, nrg_scale=0.0) -> Request:
        if not self.is_video:
            num_frames = None
        elif num_frames is None:
            num_frames = self.sampling_defaults["num_frames"]
        return validate_request(self.limits, prompt, seed, steps, cfg, w, height=height, width=width,
                                num_frames=num_frames, expert_weights=expert_weights, nrg_weights=nrg_weights,
                                nrg_scale=nrg_scale)

    def guidance(self, req: Request) -> dict:
        """Keyword arguments of genalign.cli.guidance_combiner for the aligned sample."""
        g: dict = {}
        if len(self.lora_names) == 1:
            g["rlg_scale"] = req.w
        elif len(self.lora_names) > 1:
            shares = {n: req.expert_weights.get(n, 1.0) for n in self.lora_names}
            g["rlg_experts"] = rlg_expert_weights(req.w, shares)
        if self.nrg_reward is not None:
            g.update(nrg_reward=self.nrg_reward, nrg_scale=req.nrg_scale, nrg_prompts=[req.prompt],
                     nrg_weights={d: req.nrg_weights.get(d, 0.0) for d in self.nrg_dims})
        return g

    def _sample(self, req: Request, combiner):
        import torch

        from genalign.sampling import latents_to_uint8, sample_latents

        kw = {"num_steps": req.steps, "guidance_scale": req.cfg, "height": req.height, "width": req.width}
        if self.is_video:
            kw["num_frames"] = req.num_frames
        g = torch.Generator().manual_seed(req.seed)  # as `genalign sample --seed S`: same noise for both columns
        return latents_to_uint8(self.adapter, sample_latents(self.adapter, [req.prompt], generator=g,
                                                             combiner=combiner, **kw))[0]

    def generate(self, req: Request) -> Result:
        """Base (every LoRA off, CFG) and aligned (RLG at w, + NRG) from the same noise, then their scores."""
        from genalign.cli import guidance_combiner

        t0 = time.perf_counter()
        with self.lock:  # the LoRA on/off state of the shared network is switched per pass
            with self.adapter.lora_disabled():
                base = self._sample(req, None)
            combiner = guidance_combiner(self.adapter, guidance_scale=req.cfg, **self.guidance(req))
            aligned = self._sample(req, combiner)
        return Result(base, aligned, self.scores(base, req.prompt), self.scores(aligned, req.prompt),
                      time.perf_counter() - t0)

    # ---------------------------------------------------------------------------------------- scores and text
    def oracle_scores(self, sample, prompt: str) -> dict[str, float] | str:
        """The world oracle's VQ / TA (/ MQ) when the model is a world model and the prompt is in its language;
        otherwise a short reason."""
        if not self.is_world:
            return "n/a (not a world model)"
        from genalign.world.grammar import PromptError, parse_prompt
        from genalign.world.oracle import judge

        try:
            spec = parse_prompt(prompt)
        except PromptError as e:
            return f"n/a: {e}"
        if spec.is_video != self.is_video:
            return "n/a: a " + ("video" if spec.is_video else "still-image") + " prompt for " + (
                "a video" if self.is_video else "an image") + " model"
        return {k: round(float(v), 3) for k, v in judge(sample, prompt).as_dict().items() if math.isfinite(v)}

    def scores(self, sample, prompt: str) -> dict:
        out: dict = {}
        if self.reward is not None:
            fps = [float(self.fps)] if self.is_video else None
            d = self.reward.score_dict([sample], [prompt], fps=fps)
            scores = {k: round(float(v[0]), 4) for k, v in d.items()}
            out["reward"] = scores if self.reward.is_multi_dimensional else next(iter(scores.values()))
        out["oracle"] = self.oracle_scores(sample, prompt)
        return out

    def kl_text(self, w: float, shares: dict[str, float] | None = None) -> str:
        """The KL coefficient RLG at w acts like: beta / w, beta from each LoRA's training config if found."""
        if not self.lora_names:
            return "No LoRA loaded: w has no effect (the aligned column is the base model" + (
                " + Flow-NRG)." if self.nrg_reward is not None else ").")
        try:
            w = float(w)
        except (TypeError, ValueError):
            return "effective KL coefficient **beta/w**"
        if len(self.lora_names) == 1:
            weights = {self.lora_names[0]: w}
        else:
            weights = rlg_expert_weights(w, {n: float((shares or {}).get(n, 1.0)) for n in self.lora_names})
        parts = []
        for name, wk in weights.items():
            label = "" if len(weights) == 1 else f"{name}: "
            beta = self.betas.get(name)
            if wk == 0:
                parts.append(f"{label}w = 0, the base model (beta/w is infinite)")
            elif beta is None:
                parts.append(f"{label}effective KL coefficient **beta/w** = beta/{wk:.3g} (beta of the training run "
                             "unknown: no config.yaml next to the LoRA)")
            else:
                sched = "" if beta[1] == "constant" else f", schedule {beta[1]}"
                parts.append(f"{label}effective KL coefficient **beta/w** = {beta[0]:g}/{wk:.3g} = "
                             f"**{beta[0] / wk:.4g}**{sched}")
        return "; ".join(parts)

    def display(self, sample):
        """uint8 image -> nearest-neighbour upscaled array; video -> an MP4 file (the media writer)."""
        from genalign.media import upscale, write_video

        factor = max(1, DISPLAY_SIZE // max(sample.shape[-3], sample.shape[-2]))
        big = upscale(sample, factor) if factor > 1 else sample
        if not self.is_video:
            return big
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="genalign-demo-"))
            atexit.register(shutil.rmtree, self._tmp, True)
        # Browser-playable H.264 (yuv420p); the scores above are computed on the exact uint8 frames.
        return str(write_video(self._tmp / f"{uuid.uuid4().hex}.mp4", big, fps=self.fps, lossless=False))

    def description(self) -> str:
        loras = ", ".join(f"`{_short(p)}`" for p in self.lora_paths) or "none"
        what = "the world's " + ("video" if self.is_video else "image") + " model" if self.is_world else "model"
        parts = [f"{what} `{_short(self.path)}`", f"LoRA {loras}"]
        if self.reward is not None:
            parts.append(f"reward {type(self.reward).__name__} ({', '.join(self.reward.dimensions)})")
        if self.nrg_reward is not None:
            parts.append(f"Flow-NRG latent reward ({', '.join(self.nrg_dims)})")
        return " · ".join(parts)


def _short(path: str) -> str:
    """`<run>/lora` -> `<run>/lora`, anything else -> its folder name."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name in ("lora", "reward_model") else p.name


# ------------------------------------------------------------------------------------------------ the page
def _example_prompts(model: DemoModel) -> list[str]:
    if not model.is_world:
        return []
    if model.is_video:
        return ["blue square moving left", "red circle moving up", "green triangle moving right"]
    return ["red circle", "two yellow triangles", "green cross above magenta circle", "blue square left of red circle"]


def build_demo(model: DemoModel, *, concurrency: int = 1, max_queue: int = 64):
    """The Blocks page over a loaded DemoModel, with its queue configured. The generate event is the API
    endpoint "/generate" (keyword arguments: prompt, seed, steps, cfg, w, height, width, then num_frames for video
    models, expert_<name> per LoRA when several are loaded, nrg_<dim> per reward dimension and nrg_scale)."""
    import inspect

    import gradio as gr

    lo, hi = model.limits.w_range
    d = model.sampling_defaults
    lim = model.limits
    with gr.Blocks(title="genalign demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## genalign: base vs aligned\n" + model.description())
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", value=(_example_prompts(model) or [""])[0], max_lines=2,
                                    max_length=lim.max_prompt_chars, elem_id="prompt")
                examples = _example_prompts(model)
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[prompt], label="World prompts")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Slider(1, lim.max_steps, value=d["num_steps"], step=1, label="Steps", elem_id="steps")
                cfg = gr.Slider(0, lim.max_cfg, value=d["guidance_scale"], step=0.5, label="CFG", elem_id="cfg")
                w = gr.Slider(lo, hi, value=1.0, step=0.05, label="RLG guidance scale w",
                           info="0 = base model, 1 = aligned LoRA, >1 extrapolates", elem_id="w",
                           interactive=bool(model.lora_names))
                kl = gr.Markdown(model.kl_text(1.0), elem_id="kl")
                experts = []
                if len(model.lora_names) > 1:
                    with gr.Accordion("RLG experts (share of w per LoRA)", open=True):
                        experts = [gr.Slider(0, 1, value=1.0, step=0.05, label=n, elem_id=f"expert-{n}")
                                   for n in model.lora_names]
                nrg, nrg_scale = [], None
                if model.nrg_reward is not None:
                    with gr.Accordion("Flow-NRG (latent reward guidance)", open=True):
                        nrg = [gr.Slider(0, 1, value=1.0 / len(model.nrg_dims), step=0.05, label=f"NRG weight {dim}",
                                      elem_id=f"nrg-{dim}") for dim in model.nrg_dims]
                        nrg_scale = gr.Slider(0, lim.max_nrg_scale, value=0.0, step=0.1, label="NRG scale lambda",
                                           elem_id="nrg-scale")
                with gr.Accordion("Size", open=False), gr.Row():
                    height = gr.Number(label="Height", value=d["height"], precision=0, elem_id="height")
                    width = gr.Number(label="Width", value=d["width"], precision=0, elem_id="width")
                    frames = (gr.Number(label="Frames", value=d["num_frames"], precision=0, elem_id="frames")
                              if model.is_video else None)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                with gr.Row():
                    if model.is_video:
                        base_out = gr.Video(label="base (w = 0)", elem_id="base", autoplay=True, loop=True,
                                            buttons=["download"])
                        aligned_out = gr.Video(label="aligned (RLG)", elem_id="aligned", autoplay=True, loop=True,
                                               buttons=["download"])
                    else:  # PNG: lossless, the pixels the scores were computed on (upscaled); no "share" button
                        base_out = gr.Image(label="base (w = 0)", format="png", interactive=False, elem_id="base",
                                            buttons=["download", "fullscreen"])
                        aligned_out = gr.Image(label="aligned (RLG)", format="png", interactive=False,
                                               elem_id="aligned", buttons=["download", "fullscreen"])
                with gr.Row():
                    base_scores = gr.JSON(label="base scores", elem_id="base-scores")
                    aligned_scores = gr.JSON(label="aligned scores", elem_id="aligned-scores")
                status = gr.Markdown(elem_id="status")

        names = ["prompt", "seed", "steps", "cfg", "w", "height", "width"]
        inputs = [prompt, seed, steps, cfg, w, height, width]
        if frames is not None:
            names.append("num_frames")
            inputs.append(frames)
        names += [f"expert_{n}" for n in model.lora_names[: len(experts)]]
        inputs += experts
        if nrg_scale is not None:
            names += [f"nrg_{dim}" for dim in model.nrg_dims] + ["nrg_scale"]
            inputs += [*nrg, nrg_scale]

        def generate(*values):
            v = dict(zip(names, values))
            try:
                req = model.validate(
                    v["prompt"], v["seed"], v["steps"], v["cfg"], v["w"], v["height"], v["width"], v.get("num_frames"),
                    expert_weights={n: v[f"expert_{n}"] for n in model.lora_names if f"expert_{n}" in v},
                    nrg_weights={dim: v[f"nrg_{dim}"] for dim in model.nrg_dims if f"nrg_{dim}" in v},
                    nrg_scale=v.get("nrg_scale", 0.0))
            except DemoInputError as e:
                raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None
            try:
                r = model.generate(req)
            except Exception as e:  # noqa: BLE001 - a model-side failure: one line on the page, the traceback in the server log
                import traceback

                traceback.print_exc()
                raise gr.Error(html.escape(f"Generation failed: {type(e).__name__}: {e}", quote=False),
                               print_exception=False) from None
            shares = {n: req.expert_weights.get(n, 1.0) for n in model.lora_names}
            info = (f"seed {req.seed} · {req.steps} steps · CFG {req.cfg:g} · w {req.w:g} · "
                    f"{r.seconds:.2f} s for both columns. {model.kl_text(req.w, shares)}")
            return model.display(r.base), model.display(r.aligned), r.base_scores, r.aligned_scores, info

        # Named parameters for the API page and gradio_client keyword arguments.
        generate.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        # preprocess=False: the raw values (str / numbers) reach validate_request, which checks every range with
        # the messages above, instead of Gradio's own slider check ("Value 5 is greater than maximum value 3.").
        gr.on([button.click, prompt.submit], generate, inputs=inputs,
              outputs=[base_out, aligned_out, base_scores, aligned_scores, status], api_name="generate",
              preprocess=False)

        def update_kl(w_value, *share_values):
            return model.kl_text(w_value, dict(zip(model.lora_names, share_values)))

        for trigger in [w, *experts]:
            trigger.change(update_kl, inputs=[w, *experts], outputs=kl, queue=False, show_progress="hidden",
                           api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--model", default=None,
                   help="diffusers pipeline folder (default: the world's image model; 'world-video' for its video "
                        "model)")
    p.add_argument("--lora", action="append", default=None,
                   help="LoRA folder in diffusers format (repeatable: one expert slider each); default with a world "
                        "model: the Flow-DPO LoRA shipped with it")
    p.add_argument("--reward", default=None, help="genalign reward model folder: scores both columns (default with a "
                                                  "world model: the learned reward shipped with it)")
    p.add_argument("--nrg-reward", default=None,
                   help="noise-aware latent reward model folder: Flow-NRG sliders, one per reward dimension "
                        "(default with the world image model: the shipped latent reward)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests processed at once (default 1: the two samplings of a request hold one lock)")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def run(args) -> int:
    """Load the model, build the page and serve it until interrupted."""
    for k, v in OFFLINE_ENV.items():  # before gradio / huggingface_hub are imported
        os.environ.setdefault(k, v)
    if args.concurrency < 1 or args.max_queue < 1:
        raise SystemExit("error: --concurrency and --max-queue must be at least 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = DemoModel.load(args.model, args.lora, args.reward, args.nrg_reward)
    demo = build_demo(model, concurrency=args.concurrency, max_queue=args.max_queue)
    print(f"genalign demo: {model.description()} (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    try:
        demo.launch(server_name="127.0.0.1", server_port=args.port, share=args.share, inbrowser=False,
                    show_error=False, ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False,
                    run_history=False, footer_links=["api", "settings"], css=CSS)
    except OSError as e:
        print(f"genalign demo: error: cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genalign.app", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from genalign.cli import _user_errors

    try:
        return run(args)
    except _user_errors() as e:
        print(f"genalign demo: error: {e}", file=sys.stderr)
        return 2
