import os

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets one OpenMP
# thread: torch's default of one per core would put cores x cores threads on the machine, which
# on a 2-core VM made the suite slower than running it serially. Set before torch loads.
_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if _XDIST_WORKER:
    torch.set_num_threads(1)

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


@pytest.fixture()
def fresh_dynamo():
    """Each test starts from an empty compile cache and restores dynamo's settings (the go_fast
    tests; test_cold_start has its own, which also turns inductor's caches off)."""
    import torch.fx.experimental._config as fx_config

    torch._dynamo.reset()
    with (
        torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False),
        fx_config.patch(use_duck_shape=True),
    ):
        yield
    torch._dynamo.reset()


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


@pytest.fixture(scope="session")
def wide_model(tiny_model_dir):
    """A FLUX transformer 128 wide (the public engine's tiles are 128), with the tiny model's
    text encoders: the public checkpoint's layout tests build their files from it."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from engine.tiny_model import TINY_TRANSFORMER

    torch.manual_seed(0)
    config = {**TINY_TRANSFORMER, "attention_head_dim": 64, "axes_dims_rope": (16, 24, 24)}
    model = FluxTransformer2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0.0, 0.02)
    pipe = FluxPipeline.from_pretrained(tiny_model_dir, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe
