"""The conda environment and pyproject.toml list the same packages at the same versions."""

import tomllib
import yaml

from influence.lab.notebook import ROOT


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {spec for spec in pip_section if not spec.startswith("-e")}
    assert listed == wanted, (
        f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"
    )


def test_torch_is_pinned_to_the_cpu_wheel_version():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
