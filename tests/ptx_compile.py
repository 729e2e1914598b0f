"""Compile the Triton kernels to PTX for a GPU target, from the launcher's own arguments, on a CPU.

The test process runs under ``TRITON_INTERPRET=1`` (tests/conftest.py), where ``@triton.jit``
functions are interpreted and cannot be compiled. So: the launcher (engine.kernels.
triton_backend, engine.kernels.triton.rope) is called in the test process with its kernel
replaced by a recorder and its interpreter switches off (so it takes its GPU branch: configs of
the target architecture, ``COMPILED=True``, the host-side reciprocal of ``smooth``), and the
recorded launch is compiled by triton's own compiler in a child process without
``TRITON_INTERPRET``, specialised the way Triton's JIT specialises (integers equal to 1 become
constants, tensors and integers divisible by 16 get ``tt.divisibility``). The kernel source is
the worktree's, read at test time.

    python tests/ptx_compile.py < requests.json > results.json   (the child; used by compile_ptx)
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
_DTYPES = {"torch.uint8": "u8", "torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
           "torch.int32": "i32", "torch.int8": "i8"}  # fmt: skip


@dataclass
class Launch:
    """One recorded kernel launch: the kernel's import path, grid, arguments and options."""

    kernel: str  # "module:attribute"
    grid: tuple[int, int, int]
    args: list[Any]  # positional arguments as the launcher passed them (tensors included)
    constexprs: dict[str, Any]  # keyword constexprs
    options: dict[str, Any]  # num_warps, num_stages, maxnreg, enable_fp_fusion
    overrides: dict[str, Any] = field(default_factory=dict)  # constexprs forced (e.g. BIAS_MMA)

    def request(self, cc: int) -> dict:
        """The JSON request the child compiles."""
        args = []
        for a in self.args:
            if hasattr(a, "dtype") and hasattr(a, "shape"):
                args.append({"tensor": _DTYPES[str(a.dtype)]})
            elif isinstance(a, bool):
                args.append({"bool": a})
            elif isinstance(a, int):
                args.append({"int": a})
            elif isinstance(a, float):
                args.append({"float": a})
            else:
                raise TypeError(f"unsupported launch argument {a!r}")
        return {"kernel": self.kernel, "args": args, "constexprs": {**self.constexprs, **self.overrides},
                "options": self.options, "cc": cc}  # fmt: skip


class _Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.launches: list[Launch] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            opts = {
                k: kwargs.pop(k)
                for k in ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")
                if k in kwargs
            }
            g = tuple(grid) + (1,) * (3 - len(grid))
            self.launches.append(Launch(self.path, g, list(args), kwargs, opts))

        return launch


# The launchers' kernels (module global names, in the module that launches them).
KERNELS = {
    "gemm": ("engine.kernels.triton_backend", "w4a4_gemm_kernel", "engine.kernels.triton.gemm"),
    "act": ("engine.kernels.triton_backend", "quantize_act_kernel", "engine.kernels.triton.act"),
    "act_fp8": ("engine.kernels.triton.act_fp8", "quantize_act_fp8_kernel", "engine.kernels.triton.act_fp8"),
    "gemv": ("engine.kernels.triton_backend", "w4a16_gemv_kernel", "engine.kernels.triton.gemv"),
    "rope": ("engine.kernels.triton.rope", "qk_norm_rope_kernel", "engine.kernels.triton.rope"),
    "rope_sage": ("engine.kernels.triton.rope", "qk_norm_rope_sage_kernel", "engine.kernels.triton.rope"),
    "sage_k": ("engine.kernels.triton.rope", "sage_k_quant_kernel", "engine.kernels.triton.rope"),
}


@contextmanager
def gpu_launcher(kind: str, major: int = 8):
    """Inside: the launcher of ``kind`` records its launch (as a GPU of ``major`` would get it)."""
    launcher_mod, attr, kernel_mod = KERNELS[kind]
    rec = _Recorder(f"{kernel_mod}:{attr}")
    with ExitStack() as stack:
        lm = importlib.import_module(launcher_mod)
        stack.enter_context(mock.patch.object(lm, attr, rec))
        stack.enter_context(mock.patch.object(lm, "_major", lambda device: major))
        for mod_name, names in (
            ("engine.kernels.triton_backend", ("_INTERPRET",)),
            ("engine.kernels.triton.act", ("INTERPRET",)),
            ("engine.kernels.triton.act_fp8", ("INTERPRET",)),
            ("engine.kernels.triton.gemm", ("INTERPRET",)),
            ("engine.kernels.triton.gemv", ("INTERPRET",)),
            ("engine.kernels.triton.rope", ("INTERPRET",)),
        ):
            mod = importlib.import_module(mod_name)
            for n in names:
                stack.enter_context(mock.patch.object(mod, n, False))
        yield rec


def record(kind: str, call: Callable[[], Any], major: int = 8) -> Launch:
    """Run ``call`` (a launcher call) and return the one launch it made."""
    with gpu_launcher(kind, major) as rec:
        call()
    if len(rec.launches) != 1:
        raise RuntimeError(f"expected one {kind} launch, got {len(rec.launches)}")
    return rec.launches[0]


def run_compiled(
    args: list[str], *, timeout: float = 600, input: str | None = None, scripts: bool = False
) -> subprocess.CompletedProcess:
    """Run the child ``args`` where ``@triton.jit`` compiles: without ``TRITON_INTERPRET``, in the
    repository, with it (and, with ``scripts``, scripts/) on PYTHONPATH; output captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "scripts")] if scripts else [str(ROOT)])
    return subprocess.run(args, input=input, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def compile_ptx(requests: list[dict], timeout: float = 600) -> list[dict]:
    """Compile every request in one child process; each result has ``ptx``, ``shared``,
    ``num_warps``, ``name`` and ``params`` (indices of the arguments that are PTX parameters)."""
    res = run_compiled([sys.executable, str(Path(__file__).resolve())], input=json.dumps(requests), timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"compile child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


@triton.jit
def old_bias_tile_kernel(x_ptr, out_ptr, K, BLOCK_N: tl.constexpr, K_BIAS: tl.constexpr):
    """The bias-MMA tile as engine/kernels/triton/gemm.py built it before issue 22: a load that
    never reads (K >= 0) with ``other=0x80``. Every output should be K_BIAS * 2^14; triton 3.6
    materializes the constant sign-extended (0xffffffffffffff80), and the harness must see it."""
    kb = tl.arange(0, K_BIAS)
    rows = tl.arange(0, 16)
    bias_x = tl.load(x_ptr + kb[None, :] + 0 * rows[:, None], mask=K < 0, other=0x80).to(
        tl.int8, bitcast=True
    )
    bias_w = tl.full((BLOCK_N, K_BIAS), -128, tl.int8)
    d = tl.dot(bias_x, tl.trans(bias_w), out_dtype=tl.int32)
    tl.store(out_ptr + rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], d)


# --- the child -------------------------------------------------------------------------------------


def _compile_one(req: dict) -> dict:
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    mod_name, attr = req["kernel"].split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    values = dict(zip(fn.arg_names, req["args"], strict=False))
    sig, const, attrs, params = {}, {}, {}, []
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if p.is_constexpr:
            sig[name], const[name] = "constexpr", req["constexprs"][name]
            continue
        v = values[name]
        if "tensor" in v:
            sig[name] = "*" + v["tensor"]
            attrs[(i,)] = [["tt.divisibility", 16]]  # the caching allocator aligns to 256 bytes
            params.append(i)
            continue
        raw = v.get("int", v.get("float", v.get("bool")))
        kind, spec = native_specialize_impl(CUDABackend, raw, False, True, True)
        if kind == "constexpr":
            sig[name], const[name] = "constexpr", spec
        else:
            sig[name] = kind
            params.append(i)
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", req["cc"], 32),
        options=req["options"],
    )
    md = kernel.metadata
    return {"ptx": kernel.asm["ptx"], "shared": md.shared, "num_warps": md.num_warps, "name": md.name,
            "params": params, "sig": {k: str(v) for k, v in sig.items()}}  # fmt: skip


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("the compile child must run without TRITON_INTERPRET")
    requests = json.loads(sys.stdin.read())
    json.dump([_compile_one(r) for r in requests], sys.stdout)


if __name__ == "__main__":
    main()


# --- running a recorded launch through the PTX interpreter ---------------------------------------

OUTPUTS = {
    "w4a4_gemm_kernel": {"out_ptr"},
    "quantize_act_kernel": {"qx_ptr", "ascales_ptr", "lora_ptr"},
    "quantize_act_fp8_kernel": {"codes_ptr", "ascale_ptr", "lora_ptr"},
    "w4a16_gemv_kernel": {"y_ptr"},
    "qk_norm_rope_kernel": {"q_ptr", "k_ptr", "v_ptr"},
    "qk_norm_rope_sage_kernel": {"q8_ptr", "q_scale_ptr", "k_ptr", "k_sum_ptr"},
    "sage_k_quant_kernel": {"k8_ptr", "k_scale_ptr"},
    "old_bias_tile_kernel": {"out_ptr"},
    "gemm_epilogue_kernel": {"out_ptr"},
    "int8_attention_kernel": {"out_ptr"},
    "_attn_fwd": {"Out"},  # sageattention 1.0.6's attn_qk_int8_per_block kernel
}


def execute(
    launch: Launch, compiled: dict, ctas: list[tuple[int, int, int]] | None = None, approx: str = "exact"
):
    """Run ``launch`` from its compiled PTX in the interpreter (tests/ptx_exec.py). Tensors are
    placed in its global memory (inputs read-only; outputs filled with 0xFF bytes, so an element
    the kernel never writes reads as NaN or -1) and the outputs are copied back into the launch's
    own tensors. Returns (findings, {output name: bool mask of the bytes written})."""
    import numpy as np
    import torch

    from tests import ptx_exec as X

    kernel = X.parse(compiled["ptx"], compiled["name"])
    fn_name = launch.kernel.split(":")[1]
    mod_name = launch.kernel.split(":")[0]
    fn = getattr(importlib.import_module(mod_name), fn_name)
    names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    outs = OUTPUTS[fn_name]
    mem = X.GlobalMemory()
    placed: dict[int, tuple[str, int]] = {}  # storage pointer -> (name, base)
    tensors: dict[str, torch.Tensor] = {}
    writable = {id(launch.args[i].untyped_storage()) for i, n in enumerate(names[: len(launch.args)])
                if n in outs}  # fmt: skip
    storages = {}
    for i, a in enumerate(launch.args):
        if isinstance(a, torch.Tensor):
            st = a.untyped_storage()
            key = st.data_ptr() if st.nbytes() else -(i + 1)
            if key not in placed:
                raw = np.frombuffer(bytes(st), dtype=np.uint8) if st.nbytes() else np.zeros(0, np.uint8)
                out = any(launch.args[j].untyped_storage().data_ptr() == st.data_ptr() and names[j] in outs
                          for j in range(len(launch.args)) if isinstance(launch.args[j], torch.Tensor))  # fmt: skip
                name = names[i]
                base = mem.alloc(name, raw.size if out else raw, readonly=not out)
                placed[key] = (name, base)
                storages[name] = st
            tensors[names[i]] = a
    del writable
    args = []
    for i in compiled["params"]:
        a = launch.args[i]
        if isinstance(a, torch.Tensor):
            st = a.untyped_storage()
            key = st.data_ptr() if st.nbytes() else -(i + 1)
            args.append(placed[key][1] + a.storage_offset() * a.element_size())
        else:
            args.append(a)
    args += [0] * (len(kernel.params) - len(args))  # triton's scratch pointers: never touched here
    findings = X.launch(
        kernel, mem, args, launch.grid, 32 * compiled["num_warps"], compiled["shared"], ctas, approx
    )
    written = {}
    for name, st in storages.items():
        if name in outs:
            data = mem.get(name)
            if data.size:
                st.copy_(torch.frombuffer(bytearray(data.tobytes()), dtype=torch.uint8).untyped_storage())
            written[name] = mem.written(name)
    return findings, written
