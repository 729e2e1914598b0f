"""Project wiring: pins agree between cog.yaml and requirements.txt."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_cog_yaml_packages_match_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    cog = _pins(yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["python_packages"])
    assert cog == req
