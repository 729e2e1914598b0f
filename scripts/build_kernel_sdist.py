"""Write the CUDA kernel package (an sdist) that the container image builds and installs.

    python scripts/build_kernel_sdist.py            # rewrite engine/kernels/cuda/dist/<sdist>
    python scripts/build_kernel_sdist.py --check    # exit 1 if the committed one is stale

Cog runs ``build.run`` before it copies the project, but installs local archives named in
requirements.txt; so the extension ships as this sdist: engine/kernels/cuda/package (setup.py,
the loader) plus engine/kernels/cuda/csrc, with the build-time torch pinned to requirements.txt's
(the same CUDA build the image runs). The archive is byte-for-byte deterministic, so a test can
rebuild it and fail when a source changed without it.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA = ROOT / "engine" / "kernels" / "cuda"
NAME, VERSION = "svdq_cuda_kernels", "0.2.0"
SDIST = CUDA / "dist" / f"{NAME}-{VERSION}.tar.gz"
# torch's BuildExtension compiles the .cu files in parallel only through ninja; without it, one
# at a time (minutes of the image build).
NINJA = "ninja==1.13.2"


def torch_pin(requirements: Path = ROOT / "requirements.txt") -> str:
    """The ``torch==...`` line of requirements.txt (the CUDA build the image runs)."""
    for line in requirements.read_text().splitlines():
        if re.match(r"torch==", line.strip()):
            return line.split("#")[0].strip()
    raise ValueError(f"{requirements}: no torch== pin")


def files() -> dict[str, bytes]:
    """Archive member name (without the top folder) -> contents."""
    pyproject = f"""[build-system]
requires = ["setuptools>=68", "wheel", "{NINJA}", "{torch_pin()}"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME.replace("_", "-")}"
version = "{VERSION}"
description = "SVDQuant W4A4 CUDA kernels (int4 tensor-core MMA, sm_80/86/89)"
requires-python = ">=3.10"

[tool.setuptools]
packages = ["{NAME}"]
"""
    out = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {NAME.replace('_', '-')}\nVersion: {VERSION}\n".encode(),
        "pyproject.toml": pyproject.encode(),
        "setup.py": (CUDA / "package" / "setup.py").read_bytes(),
        f"{NAME}/__init__.py": (CUDA / "package" / NAME / "__init__.py").read_bytes(),
    }
    for src in sorted((CUDA / "csrc").iterdir()):
        if src.suffix in (".cu", ".cpp", ".h", ".cuh"):
            out[f"csrc/{src.name}"] = src.read_bytes()
    return out


def build() -> bytes:
    """The sdist's bytes: sorted members, fixed owner, mode and times."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files().items()):
            info = tarfile.TarInfo(f"{NAME}-{VERSION}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed sdist is stale")
    args = parser.parse_args()
    data = build()
    if args.check:
        if not SDIST.exists() or SDIST.read_bytes() != data:
            print(f"{SDIST.relative_to(ROOT)} is stale: run python scripts/build_kernel_sdist.py", file=sys.stderr)
            return 1
        return 0
    SDIST.parent.mkdir(parents=True, exist_ok=True)
    SDIST.write_bytes(data)
    print(SDIST.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
