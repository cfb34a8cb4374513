"""The command-line frame every training command shares (`genalign train flow-dpo | reward | latent-reward`,
`python -m genalign.world.clip_pretrain`): a YAML recipe plus `key=value` overrides, `--resume`,
`--help-config`, genalign's log lines on the console, and a one-line error (exit status 2) for the mistakes a
user can fix."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def recipe_arg(value: str | None) -> str | None:
    """A recipe path, or the name of a recipe shipped in genalign.recipes (e.g. 'flow_dpo_world')."""
    if value is None or Path(value).exists():
        return value
    from ..recipes import recipe_path

    try:
        return str(recipe_path(value))
    except FileNotFoundError:
        return value  # load_config names the missing file


def training_parser(prog: str, description: str, *, config_help: str, default_config: str | None = None,
                    resume: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=default_config, help=config_help)
    if resume:
        parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as resume=...)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, config_cls, argv: list[str] | None):
    """(args, overrides with --resume folded in); None after printing every config key (--help-config)."""
    from .loop import config_help

    args = parser.parse_args(argv)
    if args.help_config:
        print(config_help(config_cls))
        return None
    resume = getattr(args, "resume", None)
    return args, list(args.overrides) + ([f"resume={resume}"] if resume else [])


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user fixes in the recipe, the data or the folders (printed as one line, no traceback)."""
    from ..config import ConfigError
    from ..data.errors import DataError
    from ..guidance.core import GuidanceError
    from ..models.base import ModelLoadError
    from ..rewards import RewardLoadError
    from .loop import CheckpointError, NonFiniteLossError

    return (ConfigError, DataError, ModelLoadError, RewardLoadError, GuidanceError, CheckpointError,
            NonFiniteLossError)


def run_training(prog: str, body: Callable[[], int]) -> int:
    """Run `body` with genalign's INFO log lines on the console (accelerate's per-file chatter stays off); a
    `user_errors()` error becomes one line on stderr and exit status 2, anything else keeps its traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("genalign").setLevel(logging.INFO)
    try:
        return body()
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def train_and_report(trainer, what: str, format_eval: Callable[[dict], str], eval_file: str = "") -> int:
    """Train, then print where the model is and, when the run evaluated on held-out data, the table and its file
    (`eval_file` under the run's eval/ folder)."""
    result = trainer.train()
    print(f"done: step {result.step}, {what} at {result.final_model_dir}")
    if trainer.eval_result is not None:
        print(format_eval(trainer.eval_result))
        print(f"evaluation: {result.output_dir / 'eval' / eval_file}")
    return 0


def world_stage_main(prog: str, description: str, trainer_cls, default_config: str,
                     report: Callable[[Any, Any], str], argv: list[str] | None) -> int:
    """The command line of a world pretraining stage (`python -m genalign.world.clip_pretrain`, ...): a recipe
    (`default_config` unless --config) plus key=value overrides -> `trainer_cls.from_config(config).train()` under
    `run_training`; prints "done: step N, " and `report(trainer, result)`."""
    from ..config import load_config

    config_cls = trainer_cls.config_class
    parser = training_parser(prog, description, default_config=default_config,
                             config_help=f"YAML recipe (default: {default_config})", resume=False)
    parsed = parse_training_args(parser, config_cls, argv)
    if parsed is None:
        return 0
    args, overrides = parsed

    def train() -> int:
        trainer = trainer_cls.from_config(load_config(config_cls, recipe_arg(args.config), overrides))
        result = trainer.train()
        print(f"done: step {result.step}, {report(trainer, result)}")
        return 0

    return run_training(prog, train)
