"""The install is part of the product: pins are exact and environment.yml mirrors pyproject.toml."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject_pins() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]


def test_every_dependency_is_pinned_exactly():
    pins = pyproject_pins()
    assert all("==" in pin for pin in pins), [p for p in pins if "==" not in p]
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins


def test_environment_yml_mirrors_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(pyproject_pins())
