"""The container image, checked statically: no Docker engine or cog CLI runs on these machines.

What Cog does with these files was read from Cog's own source (replicate/cog: the config schema,
pkg/config and pkg/dockerfile): it validates cog.yaml against the schema kept in
tests/data (copied from replicate/cog, commit 6110c91, Apache-2.0), keeps a `--extra-index-url`
line and a torch version missing from its table as written, installs local archives named in
requirements.txt, strips any `cog` pin there, and copies everything not in .dockerignore.
"""

import fnmatch
import json
import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from build_kernel_sdist import SDIST, build, torch_pin

ROOT = Path(__file__).resolve().parent.parent
COG = yaml.safe_load((ROOT / "cog.yaml").read_text())
REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]


def test_cog_yaml_validates_against_cogs_own_schema():
    schema = json.loads((ROOT / "tests" / "data" / "cog_config_schema_v1.0.json").read_text())
    jsonschema.validate(COG, schema)
    # The current form: no deprecated keys; the predictor under `run`, the SDK under sdk_version.
    assert "predict" not in COG and "python_packages" not in COG["build"]
    assert COG["run"] == "predict.py:Predictor"
    assert COG["build"]["python_requirements"] == "requirements.txt"
    assert re.fullmatch(r"\d+\.\d+\.\d+", COG["build"]["sdk_version"])


def test_torch_is_the_cuda_build_of_the_images_nvcc():
    pin = torch_pin()
    tag = re.fullmatch(r"torch==[\d.]+\+cu(\d+)(\d)", pin)
    assert tag, f"{pin}: name the CUDA build (+cuXYZ) so pip cannot take PyPI's CUDA 13 wheel"
    assert f"{tag[1]}.{tag[2]}" == COG["build"]["cuda"]
    assert f"--extra-index-url https://download.pytorch.org/whl/cu{tag[1]}{tag[2]}" in REQUIREMENTS
    # The kernel package compiles against that same torch.
    sdist_pyproject = tomllib.loads(dict(_sdist_members())["pyproject.toml"].decode())
    assert pin in sdist_pyproject["build-system"]["requires"]


def test_cog_sdk_is_pinned_by_cog_yaml_not_requirements():
    assert not any(re.match(r"(cog|coglet)\b", line) for line in REQUIREMENTS)


def _sdist_members() -> list[tuple[str, bytes]]:
    with tarfile.open(SDIST) as tar:
        return [(m.name.split("/", 1)[1], tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def test_kernel_package_is_listed_and_current():
    assert f"./{SDIST.relative_to(ROOT)}" in REQUIREMENTS
    assert SDIST.read_bytes() == build(), "stale: run python scripts/build_kernel_sdist.py"
    names = {name for name, _ in _sdist_members()}
    assert {"setup.py", "pyproject.toml", "svdq_cuda_kernels/__init__.py"} <= names
    assert {f"csrc/{p.name}" for p in (ROOT / "engine/kernels/cuda/csrc").iterdir()} <= names
    # ninja among the build requirements: BuildExtension compiles the .cu files in parallel with it
    pyproject = tomllib.loads(dict(_sdist_members())["pyproject.toml"].decode())
    assert any(r.startswith("ninja==") for r in pyproject["build-system"]["requires"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_package_compiles_from_a_clean_copy(tmp_path):
    with tarfile.open(SDIST) as tar:
        tar.extractall(tmp_path, filter="data")
    src = next(tmp_path.iterdir())
    # Its own device code alone, for the A40's arch (the other archs: test_kernels_cuda.py).
    for cu in sorted((src / "csrc").glob("*.cu")):
        cmd = [
            "nvcc",
            "-O3",
            "-c",
            str(cu),
            "-o",
            str(tmp_path / f"{cu.stem}.o"),
            "-gencode=arch=compute_86,code=sm_86",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=src)
        assert res.returncode == 0, res.stderr
    setup = (src / "setup.py").read_text()
    assert '"8.0;8.6;8.9"' in setup and 'os.environ.pop("CFLAGS"' in setup


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for these simple patterns: a pattern matches the path or a parent folder."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(parts[-1], pat.removeprefix("**/"))
        for pat in patterns
        for p in prefixes
    )


def test_dockerignore_keeps_environments_and_caches_out():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        "weights/cache/x.safetensors",
        "weights/tiny/model",
        ".git/HEAD",
        "out/out-0.webp",
        "engine/__pycache__/x.pyc",
    ):
        assert _dockerignored(path, patterns), path
    for path in (
        "predict.py",
        "engine/service/__init__.py",
        "weights/manifest.json",
        "requirements.txt",
        f"{SDIST.relative_to(ROOT)}",
        ".cog/openapi_schema.json",
        "weights/baked/flux-schnell/vae/diffusion_pytorch_model.safetensors",  # baked mode only: it
        "weights/baked/compile-cache/triton/x.cubin",  # exists only after scripts/bake_weights.py
    ):
        assert not _dockerignored(path, patterns), path
