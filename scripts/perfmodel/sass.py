"""One reader of compiled kernels: compiling (nvcc for the CUDA file, Triton's compiler as its JIT
would), ptxas' resource report, disassembling (cuobjdump, nvdisasm), the PTX checks, and finding
the loops of the SASS (the instructions from a backward branch's target to the branch).

Two SASS forms: the CUDA model reads cuobjdump's listing as ``Instr`` rows with addresses (its
loop: the innermost backward branch around a marker opcode); the Triton models read nvdisasm's
listing as instruction strings, with every loop body (``disassemble``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "engine" / "kernels" / "cuda" / "csrc"
KERNEL_SOURCES = tuple(sorted(CSRC.glob("*.cu")))  # one translation unit per kernel family
TILE_SOURCES = (CSRC / "fragments.cuh", *KERNEL_SOURCES)  # where the tile constants live
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_TYPES = {torch.uint8: "u8", torch.int8: "i8", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --- the CUDA file: nvcc, ptxas -v, cuobjdump ---------------------------------------------------


def tool(name: str) -> str:
    """nvcc from PATH; cuobjdump from PATH or the copy inside the triton package."""
    found = shutil.which(name)
    if found:
        return found
    path = BIN / name
    if path.exists():
        return str(path)
    raise FileNotFoundError(f"{name} not found (install the CUDA toolkit or triton)")


@dataclass
class Resources:
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    static_smem: int


def nvcc_cubin(arch: str, out_dir: Path, werror: bool = True) -> tuple[list[Path], dict[str, Resources], str]:
    """nvcc -cubin of each kernel source for one arch with ptxas -v; returns the cubins, resources per
    mangled kernel, stderr."""
    cmd = [tool("nvcc"), "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v,-warn-spills"]
    if werror:
        cmd += ["-Werror", "all-warnings"]
    cubins, stderr = [], ""
    for source in KERNEL_SOURCES:
        cubin = out_dir / f"{source.stem}_sm{arch}.cubin"
        res = subprocess.run([*cmd, str(source), "-o", str(cubin)], capture_output=True, text=True, timeout=900)
        if res.returncode:
            raise RuntimeError(f"nvcc failed for {source.name}, sm_{arch}:\n{res.stderr[-4000:]}")
        cubins.append(cubin)
        stderr += res.stderr
    return cubins, parse_ptxas(stderr), stderr


def parse_ptxas(text: str) -> dict[str, Resources]:
    out: dict[str, Resources] = {}
    name = None
    frame = (0, 0, 0)
    for line in text.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m[1]
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            frame = (int(m[1]), int(m[2]), int(m[3]))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            out[name] = Resources(int(m[1]), *frame, int(smem[1]) if smem else 0)
            name = None
    return out


@dataclass
class Instr:
    addr: int
    pred: str
    opcode: str
    operands: str


def cuobjdump_sass(cubin: Path) -> dict[str, list[Instr]]:
    """SASS of every kernel in the cubin, by mangled name."""
    res = subprocess.run(
        [tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, timeout=300
    )
    if res.returncode:
        raise RuntimeError(f"cuobjdump failed: {res.stderr[-2000:]}")
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    pat = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
    for line in res.stdout.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = funcs.setdefault(m[1], [])
        elif current is not None and (m := pat.search(line)):
            current.append(Instr(int(m[1], 16), (m[2] or "").strip(), m[3], m[4].strip()))
    return funcs


def find_kernel(funcs: dict[str, list[Instr]], *needles: str) -> tuple[str, list[Instr]]:
    names = [n for n in funcs if all(s in n for s in needles)]
    if len(names) != 1:
        raise KeyError(f"expected one kernel matching {needles}, found {names}")
    return names[0], funcs[names[0]]


def main_loop(code: list[Instr], marker: str) -> list[Instr]:
    """The instructions of the innermost backward-branch loop whose body holds `marker` instructions."""
    best: list[Instr] | None = None
    for ins in code:
        if ins.opcode.startswith("BRA") and (m := re.search(r"0x([0-9a-f]+)", ins.operands)):
            target = int(m[1], 16)
            if target < ins.addr:
                body = [i for i in code if target <= i.addr <= ins.addr]
                if any(i.opcode.startswith(marker) for i in body) and (best is None or len(body) < len(best)):
                    best = body
    if best is None:
        raise ValueError(f"no loop around {marker} instructions")
    return best


# --- Triton: compiling as the JIT would, nvdisasm ---------------------------------------------------


def specialize(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Signature, constexprs, attributes and options, derived like Triton's JIT does."""
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    sig, const, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        v = values[name]
        if param.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # the caching allocator aligns to 256 bytes
        else:
            kind, spec = native_specialize_impl(CUDABackend, v, False, True, True)
            if kind == "constexpr":
                sig[name], const[name] = "constexpr", spec
            else:
                sig[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs, options


_COMPILED: dict[str, dict] = {}


def triton_kernel(fn, args: tuple, kwargs: dict, cc: int):
    """``triton.compile`` for sm_<cc> with the JIT's specialization of these arguments."""
    sig, const, attrs, options = specialize(fn, args, kwargs)
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", cc, 32),
        options=options,
    )
    return kernel


def ptx_checks(ptx: str) -> dict:
    """Counts in the PTX of arithmetic the kernels must not compile to:

    wide_immediates: a 32-bit (or narrower) instruction given an immediate outside 32 bits: a
      sign-extended narrow constant (Triton 3.6 wrote a masked load's 8-bit ``other=0x80`` as
      ``mov.u32 %r, 0xffffffffffffff80``: bytes -128, -1, -1, -1);
    div_approx: fp32 division that is not IEEE (``div.full.f32``, ``div.approx.f32``: Triton's
      ``/``), where the reference divides exactly;
    max_drops_nan: fp32 ``max``/``min`` without ``.NaN`` (drops a NaN operand; torch propagates it).
    """
    wide = re.findall(
        r"^\s*(?:@!?%p\d+\s+)?\w+(?:\.\w+)*\.[bsu](?:8|16|32)\b[^;]*\b0x[0-9a-fA-F]{9,}\b", ptx, re.M
    )
    return {
        "ptx_wide_immediates": len(wide),
        "ptx_div_approx": len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx)),
        "ptx_max_drops_nan": len(re.findall(r"\b(?:max|min)(?:\.ftz)?\.f32\b", ptx)),
    }


def _run(tool: str, *args: str) -> str:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, check=True).stdout


def load_bytes(opcode: str) -> int:
    """Bytes per thread of a global load opcode (LDG, LDGSTS)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


def disassemble(cubin: bytes) -> tuple[str, list[str], list[list[str]]]:
    """``cuobjdump -res-usage`` text, every SASS instruction, and the body of every loop (the
    instructions from a backward branch's target to the branch)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _run("cuobjdump", "-res-usage", f.name)
        sass = _run("nvdisasm", "-c", f.name)
    instrs, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(instrs)
        elif m := re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            instrs.append(m.group(1))
    loops = []
    for i, text in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append(instrs[labels[m.group(1)] : i + 1])
    return usage, instrs, loops
