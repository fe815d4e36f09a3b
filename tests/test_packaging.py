"""The repository's packaging and entry points agree with each other.

environment.yml cannot be solved here (no conda), so it is parsed and compared with
pyproject.toml; the version ranges are checked against the versions this project runs; the
README and the CI script are checked for the two set-up commands.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from pathlib import Path

import pytest
import yaml  # PyYAML: a dependency of transformers, so always installed with the package
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11 (make test uses 3.11)")
ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _project_requirements() -> dict[str, Requirement]:
    """canonical name -> Requirement for [project.dependencies] and the dev extra."""
    project = _pyproject()["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    reqs = [Requirement(s) for s in specs]
    return {canonicalize_name(r.name): r for r in reqs}


def _environment() -> dict:
    with open(ROOT / "environment.yml") as f:
        return yaml.safe_load(f)


def _env_pip_lines(env: dict) -> list[str]:
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    return pip[0]


def _env_pip_requirements(env: dict) -> dict[str, Requirement]:
    # `-e .` (the package itself) is an option line, not a requirement.
    reqs = [Requirement(s) for s in _env_pip_lines(env) if not s.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def test_environment_yml_parses_and_names_the_conda_env():
    env = _environment()
    assert env["name"] == "distzo2_lab"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "pip" in conda
    python = [d for d in conda if d.startswith("python")]
    assert python == ["python=3.11"]
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains("3.11")


def test_environment_yml_lists_every_pyproject_dependency_with_the_same_range():
    project = _project_requirements()
    env = _env_pip_requirements(_environment())
    missing = sorted(set(project) - set(env))
    assert not missing, f"environment.yml lacks {missing}"
    extra = sorted(set(env) - set(project))
    assert not extra, f"environment.yml lists {extra}, which pyproject.toml does not"
    for name, req in project.items():
        if name == "torch":
            continue  # pinned to one version in environment.yml, checked below
        assert env[name].specifier == req.specifier, f"{name}: {env[name]} vs pyproject {req}"


def test_environment_yml_pins_the_cpu_torch_first_and_installs_the_package():
    lines = _env_pip_lines(_environment())
    assert lines[0] == "torch==2.13.0", "torch==2.13.0 must come first (else pip may pick a CUDA build)"
    assert "-e ." in lines


def test_torch_range_admits_the_cpu_wheel_and_rejects_2_15():
    torch = _project_requirements()["torch"]
    assert torch.specifier.contains("2.13.0")
    assert not torch.specifier.contains("2.15.0")


def test_transformers_range_is_5x():
    spec = _project_requirements()["transformers"].specifier
    for ok in ("5.0.0", "5.24.0", "5.99.1"):
        assert spec.contains(ok), ok
    for bad in ("4.57.0", "6.0.0"):
        assert not spec.contains(bad), bad


def test_makefile_installs_the_same_torch_as_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    pins = set(re.findall(r"torch==([0-9][0-9.]*)", makefile))
    assert pins == {"2.13.0"}


def test_console_script_distzo2_resolves_to_cli_main():
    target = _pyproject()["project"]["scripts"]["distzo2"]
    assert target == "distzo2_lab.cli:main"
    module, attr = target.split(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main)
    installed = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "distzo2"]
    if not installed:
        pytest.skip("distzo2_lab is not installed (run `make test`); skipped the installed entry point")
    assert installed[0].load() is main


def test_readme_shows_make_demo_and_make_test_before_the_repo_map():
    text = (ROOT / "README.md").read_text()
    heading = re.search(r"^##\s+.*\b(map|layout)\b", text, flags=re.IGNORECASE | re.MULTILINE)
    assert heading, "README.md needs a '## ... map' section"
    before = text[: heading.start()]
    first_block = re.search(r"```[^\n]*\n(.*?)```", before, flags=re.DOTALL)
    assert first_block, "README.md needs a code block before the repo map"
    for command in ("make demo", "make test"):
        line = re.compile(rf"^\s*{command}(\s|$)", flags=re.MULTILINE)
        assert line.search(first_block.group(1)), f"{command!r} is not a line of README's first code block"


@pytest.mark.parametrize("name", ["distzo2_lab", "notebooks", "tutorials", "tests", "docs", "benchmarks"])
def test_top_level_directory_exists(name):
    assert (ROOT / name).is_dir(), f"{name}/ is missing"


@pytest.mark.parametrize("name", ["environment.yml", "pyproject.toml", "Makefile", "README.md", ".ci/run"])
def test_top_level_file_exists(name):
    assert (ROOT / name).is_file(), f"{name} is missing"


def test_ci_entry_point_is_executable_and_runs_make_test():
    run = ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK), ".ci/run is not executable"
    commands = [ln.strip() for ln in run.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "make test" in commands


def test_version_is_one_source():
    import distzo2_lab

    assert Version(distzo2_lab.__version__) == Version(_pyproject()["project"]["version"])
