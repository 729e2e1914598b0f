import os

import pytest
import torch

# Tests pin the backend explicitly where it matters; everything else runs under auto.
os.environ.pop("SVDQ_KERNELS", None)
# Without a GPU the Triton kernels run in the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def use_kernels():
    """``use_kernels("triton")``: configure a kernel backend for one test (auto again after)."""
    from engine import kernels

    yield kernels.configure
    kernels.configure("auto")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny FLUX folder with its quantized checkpoint, built once per session (seconds)."""
    from engine.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
