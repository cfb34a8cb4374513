"""The wheel installs into a clean environment and every genalign.* subpackage imports from it."""

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _subpackages_on_disk() -> list[str]:
    names = []
    for top, prefix in (("genalign", "genalign"), ("rewards", "genalign.rewards"), ("pipelines", "genalign.pipelines"),
                        ("app", "genalign.app")):
        for init in sorted((REPO / top).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / top).parts
            names.append(".".join((prefix, *rel)))
    return names


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_imports_every_subpackage(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True)
    wheel = next(dist.glob("genalign-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # The clean venv sees the test environment's third-party packages (torch, diffusers, ...) but not genalign.
    (site / "ci_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True)
    modules = _subpackages_on_disk()
    assert {"genalign.rewards", "genalign.pipelines", "genalign.app", "genalign.world"} <= set(modules)
    script = textwrap.dedent(f"""
        import importlib, pathlib
        for name in {modules!r}:
            mod = importlib.import_module(name)
            assert pathlib.Path(mod.__file__).is_relative_to({str(site)!r}), (name, mod.__file__)
        from genalign.world import ASSETS
        shipped = sorted(p.name for p in ASSETS.glob("*/model_index.json"))
        print("ok", len({modules!r}), shipped)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([py, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
    # the shipped world models travel inside the wheel
    src_models = sorted(p.parent.name for p in (REPO / "genalign/world/assets").glob("*/model_index.json"))
    assert str(["model_index.json"] * len(src_models)) in out.stdout


def test_import_genalign_stays_light():
    code = "import sys, genalign, genalign.flow, genalign.world.grammar; " \
           "print(sorted(m for m in ('diffusers', 'gradio', 'open_clip', 'xformers', 'transformers') if m in sys.modules))"
    out = subprocess.check_output([sys.executable, "-c", code], text=True, cwd=REPO)
    assert out.strip() == "[]"
