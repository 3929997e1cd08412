"""The built wheel works on its own: a user who runs `pip install coreg` gets no checkout beside it.

The wheel is built from a copy of the package sources (so nothing the checkout has, e.g. a stale `build/`
or files outside the packages, can leak in), installed with `--target` into an empty folder, and run from a
working directory outside the checkout with only that folder on PYTHONPATH: `pipeline`, `annotators` and
`stages` then come from the wheel, the third-party libraries from this environment. It annotates a tiny
image folder with a tiny random `local-dir:` CLIP kept outside the checkout, which reads the built-in prompt
templates: the package data the wheel must carry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.tiny import make_image_folder, make_tiny_clip

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "annotators", "stages")

pytestmark = pytest.mark.packaging


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path_factory.mktemp("wheels")
    # --no-build-isolation: build with this environment's setuptools (offline, and seconds instead of minutes).
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("coreg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "annotators/prompts/paper27.txt" in names and "annotators/prompts/llava_questions.txt" in names
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)])
    return target


def _env(target: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_the_wheel_alone_annotates_with_its_builtin_templates(installed, tmp_path):
    images = make_image_folder(tmp_path / "images", n_per_class=2, size=32)
    clip = make_tiny_clip(tmp_path / "clip")  # `local-dir:` outside the checkout
    work = tmp_path / "cwd"
    work.mkdir()
    code = (
        "import json, sys, annotators, pipeline, stages\n"
        "print(json.dumps({m.__name__: m.__file__ for m in (pipeline, annotators, stages)}))\n"
        "from stages.cli import app\n"
        "sys.argv = ['coreg'] + sys.argv[1:]\n"
        "app()\n"
    )
    out = tmp_path / "annotated"
    args = ["annotate", str(images), str(out), "--model", clip, "--device", "cpu", "--batch-size", "4",
            "--num-workers", "1", "--templates", "paper27"]
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=_env(installed), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    where = json.loads(r.stdout.splitlines()[0])
    for name, file in where.items():  # imported from the wheel's copy, not the checkout
        assert Path(file).resolve().is_relative_to(installed.resolve()), (name, file)
    info = json.loads((out / "annotation.json").read_text())
    assert len(info["prompts"]) == 27 and info["prompts"][0] == "a photo of a {}"


def test_the_wheel_alone_reads_the_llava_questions(installed, tmp_path):
    code = "from annotators.templates import load_questions; print(len(load_questions('default')))"
    r = _run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed))
    assert int(r.stdout.strip()) >= 3
