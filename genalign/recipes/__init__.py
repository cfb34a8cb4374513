"""YAML recipes shipped with genalign: `load_config(FlowDPOConfig, recipe_path("flow_dpo_world"), ["k=v"])`."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The path of a shipped recipe by name ('flow_dpo_world' or 'flow_dpo_world.yaml')."""
    path = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"no shipped recipe {name!r}; available: {', '.join(list_recipes())}")
    return path
