"""The kernel contract (engine/kernels/contract.py) is stated once: every backend module, the
public wrappers, the torch custom ops and the CUDA extension's C++ schema must match it."""

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.kernels import contract

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {  # module -> the protocols it implements
    "engine.kernels.reference": (
        contract.GemmBackend,
        contract.GemvBackend,
        contract.PrologueBackend,
        contract.W4A8Backend,
    ),
    "engine.kernels.triton_backend": (
        contract.GemmBackend,
        contract.GemvBackend,
        contract.PrologueBackend,
        contract.W4A8Backend,
    ),
    "engine.kernels.cuda": (contract.GemmBackend,),  # gemv and prologue: routed to triton
}
# Public wrapper -> its options beyond the op's own arguments (quantize_act's prologues call
# the quantize_act_prologue op, whose arguments the op test below checks).
WRAPPER_EXTRA = {"quantize_act": ["modulation", "gelu"]}
# quantize_act_fp8's wrapper takes the prologue as quantize_act's does (modulation=(scale, shift)).
WRAPPER_NAMES = {"quantize_act_fp8": ["x", "smooth", "proj_down", "shift", "modulation", "gelu"]}


def _params(fn, *, drop_self: bool = False) -> list[tuple[str, inspect._ParameterKind, object]]:
    params = list(inspect.signature(fn).parameters.values())
    return [(p.name, p.kind, p.default) for p in params[1 if drop_self else 0 :]]


@pytest.mark.parametrize("module_name", list(BACKENDS))
def test_every_backend_signature_is_the_contract(module_name):
    module = importlib.import_module(module_name)
    assert isinstance(module.NAME, str)
    assert _params(module.unavailable_reason) == _params(contract.GemmBackend.unavailable_reason, drop_self=True)
    for protocol in BACKENDS[module_name]:
        for op in contract.OPS[protocol]:
            got, want = _params(getattr(module, op)), _params(getattr(protocol, op), drop_self=True)
            assert got == want, f"{module_name}.{op} drifted from the contract"


def test_every_gemm_backend_is_listed():
    assert {importlib.import_module(m).NAME for m in BACKENDS} == set(kernels.BACKENDS)


@pytest.mark.parametrize(
    "op", ["quantize_act", "quantize_act_prologue", "w4a4_gemm", "w4a16_gemv", "quantize_act_fp8", "w4a8_gemm"]
)
def test_wrappers_and_custom_ops_take_the_contracts_arguments(op):
    protocol = next(p for p, ops in contract.OPS.items() if op in ops)
    names = [n for n, _, _ in _params(getattr(protocol, op), drop_self=True)]
    # The public wrapper: same names, same order (it adds defaults for the options).
    if hasattr(kernels, op):
        want = WRAPPER_NAMES.get(op, names + WRAPPER_EXTRA.get(op, []))
        assert [n for n, _, _ in _params(getattr(kernels, op))] == want
    # The torch custom op: the same arguments, all positional.
    schema = getattr(torch.ops.svdq, op).default._schema
    assert [a.name for a in schema.arguments] == names


def test_cuda_extension_schema_is_the_contract():
    source = (ROOT / "engine/kernels/cuda/csrc/ops.cpp").read_text()
    defs = dict(re.findall(r'm\.def\(\s*"(\w+)\(([^)]*)\)', re.sub(r'"\s*\n\s*"', "", source)))
    assert set(defs) == set(contract.OPS[contract.GemmBackend])
    for op, args in defs.items():
        got = [a.strip().split()[-1] for a in args.split(",")]
        want = [n for n, _, _ in _params(getattr(contract.GemmBackend, op), drop_self=True)]
        assert got == want, f"ops.cpp's {op} schema drifted from the contract"
