"""Static checks and a performance model of the Triton kernels, from their compiled SASS.

No GPU needed: each kernel is compiled for sm_90 and sm_86 by Triton's own ptxas, with the
arguments the backend's launcher really passes for FLUX's shapes (captured from the launcher
called on meta tensors, so strides, group-major scales and Triton's integer specialization are
the real ones), for every config in the kernels' fixed tables. The cubins are disassembled with
the nvdisasm that ships with Triton, and the main loop (the backward branch around the MMA, or
the kernel's longest loop) is counted instruction by instruction.

    python scripts/kernel_model_triton.py [--json PATH] [--markdown]

Gates (exit status 1 when one fails; tests/test_triton_static.py runs them in CI):
  every kernel: no spills (no stack frame, no STL/LDL);
  w4a4_gemm: int8 MMA in the main loop, no I2F there, no flush-to-zero float op there (the
    Hopper conversion reads int32s as fp32 subnormals), an MMA with its accumulator off where
    the config takes the bias-MMA conversion, at most 600 SASS per 64-wide group per thread on
    sm_90 for the config used at M = 4352;
  quantize_act: no global load narrower than 8 bytes in its loop (contiguous tiles, vectors);
  w4a16_gemv: the weight streams as 16-byte vectors.

Model (every figure is MODELLED, not measured): a kernel's time is the larger of its issue time
(SASS per loop iteration x warps / 4 schedulers, for the CTAs resident per SM, in waves over
the SMs), its tensor-core time (the MACs of the loop's MMA instructions, the bias MMA's
included, / int8 MACs per clock per SM) and its DRAM time
(unique bytes / bandwidth). "overlapped" assumes issue and tensor work of the resident warps
overlap perfectly, "serialized" that they add (each group waits on its MMA before scaling).
cuBLAS bf16 is modelled at CUBLAS_BF16_EFFICIENCY of the dense bf16 peak (an assumption, the
value docs/benchmarks.md used before). Datasheet peaks are in DEVICES.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1" and "--gemv-bytes-child" not in sys.argv:
    sys.exit("run without TRITON_INTERPRET=1: this script compiles the kernels for GPU targets")

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

import engine.kernels.triton_backend as tb
from engine.kernels.triton.act import ACT_CONFIGS
from engine.kernels.triton.gemm import GEMM_CONFIGS
from engine.kernels.triton.gemv import GEMV_BLOCK_K, GEMV_CONFIGS

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FLUX_M = 4352  # 4096 image + 256 text tokens at 1024x1024
FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]  # K -> N
RANK = 32
ADALN_SHAPES = [(3072, 18432), (3072, 9216)]  # double blocks' norm1 (6 x 3072), single blocks' (3 x)
ARCHS = (90, 86, 80)  # sm_80 shares sm_86's configs; compiled for the spill and MMA gates only
MAX_SASS_PER_GROUP_SM90 = 600
CUBLAS_BF16_EFFICIENCY = 0.70
DRAM_LATENCY_NS = 800  # loaded DRAM latency, for the bytes-in-flight bound of quantize_act
_TYPES = {torch.uint8: "u8", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Device:
    """Datasheet figures of one GPU (dense tensor rates)."""

    name: str
    cc: int
    sms: int
    clock_ghz: float  # the clock the tensor peaks are quoted at
    int8_macs_per_clk_sm: int
    bf16_fmas_per_clk_sm: int
    dram_gbs: float
    max_threads_sm: int
    smem_kb_sm: int

    def int8_tops(self) -> float:
        return 2 * self.int8_macs_per_clk_sm * self.sms * self.clock_ghz / 1e3

    def bf16_tflops(self) -> float:
        return 2 * self.bf16_fmas_per_clk_sm * self.sms * self.clock_ghz / 1e3


# H100 SXM5: 1979 int8 TOPS / 989 bf16 TFLOPS dense, 3.35 TB/s. A40: 299.3 / 149.7, 696 GB/s.
DEVICES = (
    Device("H100 SXM", 90, 132, 1.83, 4096, 2048, 3350, 2048, 228),
    Device("A40", 86, 84, 1.74, 1024, 512, 696, 1536, 100),
)


# --- capturing the launcher's arguments ------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def capture(kernel_attr: str, major: int, call) -> tuple:
    """Run a launcher of ``tb`` on meta tensors and return (grid, args, kwargs) of its launch."""
    rec, saved = _Recorder(), (getattr(tb, kernel_attr), tb._major)
    setattr(tb, kernel_attr, rec)
    tb._major = lambda device: major
    try:
        call()
    finally:
        setattr(tb, kernel_attr, saved[0])
        tb._major = saved[1]
    (launch,) = rec.calls
    return launch


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def gemm_launch(m: int, k: int, n: int, major: int, cfg, unsigned: bool = False, rank: int = RANK) -> tuple:
    g = k // 64
    ascales = _meta(g, m, dtype=torch.float32).t()  # group-major, as quantize_act returns them
    wscales = _meta(g, n, dtype=torch.float32).t()  # group-major, as SVDQLinear stores them
    args = (_meta(m, k // 2, dtype=torch.uint8), ascales, _meta(n, k // 2, dtype=torch.uint8), wscales)
    rest = (_meta(m, rank, dtype=torch.float32), _meta(n, rank), _meta(n))

    def call():
        tb.launch_w4a4_gemm(*args, *rest, unsigned=unsigned, out_dtype=torch.bfloat16, config=cfg)

    return capture("w4a4_gemm_kernel", major, call)


def act_launch(m: int, k: int, major: int, rank: int = RANK, prologue: str = "") -> tuple:
    """quantize_act's launch; ``prologue`` "modulation" or "gelu": quantize_act_prologue's."""

    def call():
        x, smooth, down = _meta(m, k), _meta(k), _meta(rank, k)
        if not prologue:
            tb.quantize_act(x, smooth, down, group_size=64, unsigned=False, shift=0.0)
            return
        mod = (_meta(1, k), _meta(1, k)) if prologue == "modulation" else (None, None)
        tb.quantize_act_prologue(
            x, smooth, down, *mod, group_size=64, unsigned=False, shift=0.0, gelu=prologue == "gelu"
        )

    return capture("quantize_act_kernel", major, call)


def gemv_launch(m: int, k: int, n: int, major: int) -> tuple:
    def call():
        tb.w4a16_gemv(
            _meta(m, k), _meta(n, k // 2, dtype=torch.uint8), _meta(n, k // 64), _meta(n, k // 64), _meta(n)
        )

    return capture("w4a16_gemv_kernel", major, call)


# --- compiling as the JIT would ----------------------------------------------------------------


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


def compile_sass(fn, args: tuple, kwargs: dict, cc: int) -> dict:
    """Compile for sm_<cc>; return the SASS analysis (cached per specialization)."""
    sig, const, attrs, options = specialize(fn, args, kwargs)
    key = repr((fn.__name__, cc, sorted(sig.items()), sorted(const.items()), sorted(attrs), options))
    if key not in _COMPILED:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options=options,
        )
        info = analyse(kernel.asm["cubin"]) | ptx_checks(kernel.asm["ptx"])
        info.update(shared_bytes=kernel.metadata.shared, **options)
        _COMPILED[key] = info
    return _COMPILED[key]


# --- reading the PTX and the SASS --------------------------------------------------------------


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


def opcode_counts(body: list[str]) -> Counter:
    """Opcodes (predicates stripped) of a list of SASS instructions."""
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)


def analyse(cubin: bytes) -> dict:
    """Registers, spills and the main loop's instruction mix of one kernel."""
    usage, instrs, loops = disassemble(cubin)
    reg = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    # The main loop: the longest loop with an int8 MMA (the GEMM's groups; its low-rank loop runs
    # HMMA), else with any MMA (quantize_act's down-projection), else the longest loop.
    imma = [body for body in loops if any(re.search(r"\b(IGMMA|IMMA)", t) for t in body)]
    mma = [body for body in loops if any(re.search(r"\b(IGMMA|IMMA|HMMA)", t) for t in body)]
    main = max(imma or mma or loops, key=len) if loops else []
    ops = opcode_counts(main)
    # Accumulator resets to the magic bits: moves of the literal, and moves from a register that
    # holds it (ptxas may copy the literal once and move the copy).
    magic, resets = set(), 0
    for t in main:
        op, _, rest = re.sub(r"^@!?U?P\w+\s+", "", t).partition(" ")
        args = [a.strip().removesuffix(".reuse") for a in rest.split(",")]
        dest = args[0] if re.fullmatch(r"R\d+", args[0]) else None
        if "0x4b400000" in t or (op in ("MOV", "IMAD.MOV.U32") and args[-1] in magic):
            resets += 1
            magic.add(dest)
        elif dest:
            magic.discard(dest)
    loads = {op: c for op, c in ops.items() if re.match(r"(LDG|LDGSTS)(\.|$)", op)}
    return {
        "regs": int(reg.group(1)),
        "stack_bytes": int(reg.group(2)),
        "spill_instrs": sum(1 for t in instrs if re.search(r"\b(STL|LDL)\b", t)),
        "loop_sass": len(main),
        "loop_ops": dict(ops.most_common()),
        "loop_i2f": sum(c for op, c in ops.items() if op.startswith("I2F")),
        "loop_mma": sum(c for op, c in ops.items() if re.match(r"(IGMMA|IMMA)", op)),
        "loop_load_bytes": sum(load_bytes(op) * c for op, c in loads.items()),
        "loop_narrowest_load": min((load_bytes(op) for op in loads), default=0),
        "acc_init": resets,
        "loop_mma_acc_off": sum(1 for t in main if re.search(r"\bIGMMA\b.*, RZ, !UPT", t)),
        "loop_ftz": sum(1 for t in main if re.search(r"\bF(FMA|MUL|ADD)\S*\.FTZ", t)),
    }


# --- gates ---------------------------------------------------------------------------------------


def gemm_configs() -> list[tuple[int, str, object]]:
    return [(cc, name, cfg) for cc in ARCHS for name, cfg in GEMM_CONFIGS[cc // 10].items()]


def _variants(fn, cc: int, launches: dict) -> list[tuple[list, dict]]:
    """Compile each shape's launch; group the shapes that share one specialization."""
    by_key: dict[int, tuple[list, dict]] = {}
    for shape, (_, args, kwargs) in launches.items():
        info = compile_sass(fn, args, kwargs, cc)
        by_key.setdefault(id(info), ([], info))[0].append(list(shape))
    return list(by_key.values())


def static_report() -> dict:
    """Compile every kernel and config for each arch on FLUX's shapes; count the SASS."""
    report: dict = {"gemm": [], "act": [], "gemv": []}
    for cc, name, cfg in gemm_configs():
        for unsigned in (False, True):
            launches = {
                (FLUX_M, k, n): gemm_launch(FLUX_M, k, n, cc // 10, cfg, unsigned) for k, n in FLUX_SHAPES
            }
            for shapes, info in _variants(tb.w4a4_gemm_kernel, cc, launches):
                entry = {"cc": cc, "config": name, **asdict(cfg), "unsigned": unsigned, "shapes": shapes}
                report["gemm"].append(entry | info)
    for cc in ARCHS:
        launches = {(FLUX_M, k): act_launch(FLUX_M, k, cc // 10) for k in sorted({k for k, _ in FLUX_SHAPES})}
        for shapes, info in _variants(tb.quantize_act_kernel, cc, launches):
            report["act"].append({"cc": cc, **asdict(ACT_CONFIGS[cc // 10]), "shapes": shapes, **info})
        for m in (1, 2, 4):
            launches = {(m, k, n): gemv_launch(m, k, n, cc // 10) for k, n in ADALN_SHAPES}
            for shapes, info in _variants(tb.w4a16_gemv_kernel, cc, launches):
                report["gemv"].append(
                    {"cc": cc, "rows": m, **asdict(GEMV_CONFIGS[cc // 10]), "shapes": shapes, **info}
                )
    return report


def gate_failures(report: dict) -> list[str]:
    """The static performance gates; an empty list when all pass."""
    bad = []
    for kind in ("gemm", "act", "gemv"):
        for e in report[kind]:
            tag = f"{kind} sm_{e['cc']} {e.get('config', '')} {e}"[:120]
            if e["stack_bytes"] or e["spill_instrs"]:
                bad.append(f"{tag}: spills ({e['stack_bytes']} B stack, {e['spill_instrs']} STL/LDL)")
    for e in report["gemm"]:
        tag = f"gemm sm_{e['cc']} {e['config']} unsigned={e['unsigned']}"
        if not e["loop_mma"]:
            bad.append(f"{tag}: no int8 MMA in the main loop")
        if e["loop_i2f"]:
            bad.append(f"{tag}: {e['loop_i2f']} I2F in the main loop")
        if e["cc"] == 90 and e["config"] == "large" and e["loop_sass"] > MAX_SASS_PER_GROUP_SM90:
            bad.append(f"{tag}: {e['loop_sass']} SASS per group > {MAX_SASS_PER_GROUP_SM90}")
        if e["loop_ftz"]:
            bad.append(f"{tag}: {e['loop_ftz']} flush-to-zero float ops in the main loop")
        if e["bias_mma"] and not e["loop_mma_acc_off"]:
            bad.append(f"{tag}: bias_mma without an MMA that has its accumulator off")
    for e in report["act"]:
        if e["loop_narrowest_load"] < 8:
            bad.append(
                f"quantize_act sm_{e['cc']}: a {e['loop_narrowest_load']}-byte global load in its loop"
            )
    for e in report["gemv"]:
        if e["loop_ops"].get("LDG.E.128", 0) + e["loop_ops"].get("LDGSTS.E.BYPASS.128", 0) == 0:
            bad.append(
                f"w4a16_gemv sm_{e['cc']} rows={e['rows']}: the weight does not load as 16-byte vectors"
            )
    return bad


# --- W4A16 GEMV: bytes from the kernel's own loads (interpreter) -----------------------------------


def gemv_bytes(m: int, k: int, n: int) -> dict:
    """Run the GEMV under the interpreter with its GPU launch config, recording every load's
    addresses: total and unique bytes per tensor. Must run with TRITON_INTERPRET=1."""
    import numpy as np
    from triton.runtime import interpreter

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "x": torch.randn(m, k, generator=gen).bfloat16(),
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8),
        "wscales": torch.rand(n, k // 64, generator=gen).bfloat16(),
        "wzeros": torch.rand(n, k // 64, generator=gen).bfloat16(),
        "bias": torch.randn(n, generator=gen).bfloat16(),
    }
    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()}
    seen: dict[str, list] = {name: [] for name in tensors}
    original = interpreter.InterpreterBuilder.create_masked_load

    def recording_load(self, ptrs, mask, *rest):
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        addrs = ptrs.data[live]
        elem = ptrs.dtype.element_ty.primitive_bitwidth // 8
        for name, (lo, hi) in spans.items():
            hit = addrs[(addrs >= lo) & (addrs < hi)].astype(np.int64)
            if hit.size:
                seen[name].append(hit[:, None] + np.arange(elem))  # every byte the load touches
        return original(self, ptrs, mask, *rest)

    saved_cfg = tb.gemv_config
    tb.gemv_config = lambda major: GEMV_CONFIGS[9]  # the GPU launch config, not the interpreter's
    interpreter.InterpreterBuilder.create_masked_load = recording_load
    try:
        y = tb.w4a16_gemv(*tensors.values())
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original
        tb.gemv_config = saved_cfg
    err = (y.float() - _gemv_reference(tensors).float()).abs().max().item()
    out = {"shape": [m, k, n], "max_abs_err_vs_reference": err}
    for name, hits in seen.items():
        loaded = sum(h.size for h in hits)
        unique = np.unique(np.concatenate([h.ravel() for h in hits])).size if hits else 0
        out[name] = {
            "bytes": tensors[name].numel() * tensors[name].element_size(),
            "loaded": int(loaded),
            "unique": int(unique),
        }
    return out


def _gemv_reference(t: dict) -> torch.Tensor:
    from engine.kernels import reference

    return reference.w4a16_gemv(t["x"], t["qweight"], t["wscales"], t["wzeros"], t["bias"])


def gemv_bytes_subprocess(m: int, k: int, n: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = [sys.executable, __file__, "--gemv-bytes-child", f"{m},{k},{n}"]
    res = subprocess.run(code, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout)


# --- the model ---------------------------------------------------------------------------------


def _ctas_per_sm(info: dict, warps: int, dev: Device) -> int:
    threads = warps * 32
    regs = math.ceil(info["regs"] / 8) * 8 * threads
    smem = max(info["shared_bytes"], 1)
    return max(1, min(65536 // regs, dev.max_threads_sm // threads, dev.smem_kb_sm * 1024 // smem, 32))


def mma_macs(ops: dict, warps: int) -> int:
    """Int8 MACs of one loop iteration of a CTA, from its MMA instructions: an IGMMA.MxNxK is one
    warpgroup's (four warps issue it together), an IMMA.MNK one warp's."""
    total = 0
    for op, count in ops.items():
        if m := re.match(r"IGMMA\.(\d+)x(\d+)x(\d+)", op):
            total += count * math.prod(map(int, m.groups())) * (warps // 4)
        elif m := re.match(r"IMMA\.(\d+)(\d)(\d\d)", op):
            total += count * math.prod(map(int, m.groups())) * warps
    return total


def model_gemm(m: int, k: int, n: int, dev: Device, info: dict, cfg, group: int = 64) -> dict:
    """Modelled time of w4a4_gemm (see the module docstring); one step is one group of
    ``group`` channels, its SASS the loop's divided by the groups per iteration."""
    c = _ctas_per_sm(info, cfg.num_warps, dev)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    per_sm = math.ceil(tiles / dev.sms)  # tiles on the busiest SM
    groups = k // group
    issue = info["loop_sass"] * cfg.num_warps / 4  # clocks per tile per group: 4 schedulers
    # tensor work as the SASS has it (the bias MMA's included), checked against the tile's dot
    macs = mma_macs(info["loop_ops"], cfg.num_warps)
    assert macs >= cfg.block_m * cfg.block_n * group, (macs, cfg)
    tensor = macs / dev.int8_macs_per_clk_sm
    clk = dev.clock_ghz * 1e9
    dram = (m * k / 2 + n * k / 2 + 2 * m * n + 8 * (m + n) * groups) / (dev.dram_gbs * 1e9)
    t_over = max(per_sm * groups * max(issue, tensor) / clk, dram)
    t_ser = max(per_sm * groups * (issue + tensor) / clk, dram)
    # One CTA per SM: its warpgroups meet at a barrier every group, so MMA and scaling take
    # turns; two or more: one CTA's MMA runs under another's scaling.
    t = t_over if c >= 2 else t_ser
    ops = 2 * m * n * k
    peak = dev.int8_tops() * 1e12
    return {
        "ctas_per_sm": c,
        "tiles_per_sm": per_sm,
        "issue_clk": issue,
        "tensor_clk": tensor,
        "us": t * 1e6,
        "us_overlapped": t_over * 1e6,
        "us_serialized": t_ser * 1e6,
        "int8_frac": ops / t / peak,
        "int8_frac_overlapped": ops / t_over / peak,
        "int8_frac_serialized": ops / t_ser / peak,
    }


def model_act(m: int, k: int, dev: Device, info: dict, cfg) -> dict:
    """Modelled time of quantize_act: issue, DRAM bandwidth and bytes in flight."""
    c = _ctas_per_sm(info, cfg.num_warps, dev)
    programs = triton.cdiv(m, cfg.block_m)
    groups = k // 64
    per_sm = math.ceil(programs / dev.sms)  # programs on the busiest SM
    issue = per_sm * groups * info["loop_sass"] * cfg.num_warps / 4 / (dev.clock_ghz * 1e9)
    nbytes = m * k * 2 + m * k / 2 + m * groups * 4 + m * RANK * 4  # x in, codes, scales, lora out
    in_flight = min(programs, dev.sms * c) * cfg.num_stages * cfg.block_m * 64 * 2  # x tiles
    bw = min(dev.dram_gbs * 1e9, in_flight / (DRAM_LATENCY_NS * 1e-9))
    return {
        "ctas_per_sm": c,
        "us": max(issue, nbytes / bw) * 1e6,
        "us_dram_floor": nbytes / (dev.dram_gbs * 1e9) * 1e6,
        "us_issue": issue * 1e6,
    }


def model_table(report: dict) -> list[dict]:
    """Per device and FLUX shape: the pair's modelled time against modelled cuBLAS bf16."""
    rows = []
    for dev in DEVICES:
        cfg = tb.gemm_config(dev.cc // 10, FLUX_M)
        acfg = ACT_CONFIGS[dev.cc // 10]
        for k, n in FLUX_SHAPES:
            _, args, kwargs = gemm_launch(FLUX_M, k, n, dev.cc // 10, cfg)
            g = model_gemm(FLUX_M, k, n, dev, compile_sass(tb.w4a4_gemm_kernel, args, kwargs, dev.cc), cfg)
            _, args, kwargs = act_launch(FLUX_M, k, dev.cc // 10)
            a = model_act(FLUX_M, k, dev, compile_sass(tb.quantize_act_kernel, args, kwargs, dev.cc), acfg)
            bf16_us = 2 * FLUX_M * n * k / (dev.bf16_tflops() * 1e12 * CUBLAS_BF16_EFFICIENCY) * 1e6
            rows.append(
                {
                    "device": dev.name,
                    "k": k,
                    "n": n,
                    "act_us": a["us"],
                    "act_dram_floor_us": a["us_dram_floor"],
                    **{f"gemm_{key}": v for key, v in g.items()},
                    "cublas_bf16_us": bf16_us,
                    "pair_vs_bf16": bf16_us / (a["us"] + g["us"]),
                    "pair_vs_bf16_overlapped": bf16_us / (a["us"] + g["us_overlapped"]),
                    "pair_vs_bf16_serialized": bf16_us / (a["us"] + g["us_serialized"]),
                }
            )
    return rows


def _ceiling_row(dev: Device, conversion: str, e: dict, cfg) -> dict:
    per_thread = cfg.block_m * cfg.block_n / (cfg.num_warps * 32)
    ops = e["loop_ops"]
    epi = ops.get("FADD", 0) + ops.get("FMUL", 0) + ops.get("FFMA", 0) + e["acc_init"]
    per_elem = epi / per_thread
    # 128 lanes issue per clock per SM; an element's group step is 64 MACs; the tensor cores
    # also run the bias MMA's MACs (Hopper), so only this share of their work is the dot.
    tensor_share = cfg.block_m * cfg.block_n * 64 / mma_macs(ops, cfg.num_warps)
    return {
        "device": dev.name,
        "conversion": conversion,
        "loop_sass": e["loop_sass"],
        "epilogue_per_elem": per_elem,
        "sass_per_elem": e["loop_sass"] / per_thread,
        "tensor_share": tensor_share,
        "ceiling_epilogue_only": min(tensor_share, 128 / per_elem * 64 / dev.int8_macs_per_clk_sm),
        "ceiling_whole_loop": min(
            tensor_share, 128 / (e["loop_sass"] / per_thread) * 64 / dev.int8_macs_per_clk_sm
        ),
    }


def scale_ceiling(report: dict) -> list[dict]:
    """What per-64-group scales on both operands cost: the epilogue instructions per output
    element per group (accumulator resets, bias removal, two scale multiplies), counted in the
    sm_90/sm_86 main loop, the share of the tensor cores' work that is the dot (the rest: the
    bias MMA), and the fraction of int8 peak these allow. On H100 both conversions are counted:
    the shipped one (bias MMA) and the magic bits with a reset per group, compiled with the
    same tile config for 3072 -> 3072."""
    out = []
    for dev in DEVICES:
        cfg = tb.gemm_config(dev.cc // 10, FLUX_M)
        e = next(
            r for r in report["gemm"] if r["cc"] == dev.cc and r["config"] == "large" and not r["unsigned"]
        )
        out.append(_ceiling_row(dev, "bias MMA" if cfg.bias_mma else "magic bits", e, cfg))
        if cfg.bias_mma:
            magic = replace(cfg, bias_mma=False)
            _, args, kwargs = gemm_launch(FLUX_M, 3072, 3072, dev.cc // 10, magic)
            info = compile_sass(tb.w4a4_gemm_kernel, args, kwargs, dev.cc)
            out.append(_ceiling_row(dev, "magic bits (reset per group)", info, magic))
    return out


def gemm_launch_grouped(m: int, k: int, n: int, major: int, cfg, group: int) -> tuple:
    """gemm_launch for a checkpoint quantized with ``group``-channel groups on both operands."""
    g = k // group
    ascales, wscales = _meta(g, m, dtype=torch.float32).t(), _meta(g, n, dtype=torch.float32).t()
    args = (_meta(m, k // 2, dtype=torch.uint8), ascales, _meta(n, k // 2, dtype=torch.uint8), wscales)
    rest = (_meta(m, RANK, dtype=torch.float32), _meta(n, RANK), _meta(n))

    def call():
        tb.launch_w4a4_gemm(*args, *rest, unsigned=False, out_dtype=torch.bfloat16, config=cfg)

    return capture("w4a4_gemm_kernel", major, call)


def format_variants(table: list[dict]) -> list[dict]:
    """The format change the kernel already runs: groups of 128 channels on both operands (a
    checkpoint of our own quantizer; the public 64-group checkpoints cannot be regrouped),
    compiled with the sm_90 config for that group size and modelled on H100 like the main
    table, with quantize_act's time kept at its 64-group figure."""
    dev = DEVICES[0]
    cfg = tb.gemm_config(dev.cc // 10, FLUX_M, 128)
    rows = []
    for k, n in FLUX_SHAPES:
        _, args, kwargs = gemm_launch_grouped(FLUX_M, k, n, dev.cc // 10, cfg, 128)
        info = compile_sass(tb.w4a4_gemm_kernel, args, kwargs, dev.cc)
        assert not info["stack_bytes"] and not info["spill_instrs"], info
        g = model_gemm(FLUX_M, k, n, dev, info, cfg, group=128)
        base = next(r for r in table if r["device"] == dev.name and (r["k"], r["n"]) == (k, n))
        rows.append(
            {
                "device": dev.name,
                "k": k,
                "n": n,
                "group": 128,
                "regs": info["regs"],
                "sass_per_64_channels": info["loop_sass"] / 2,
                "gemm_us": g["us"],
                "int8_frac": g["int8_frac"],
                "pair_vs_bf16": base["cublas_bf16_us"] / (base["act_us"] + g["us"]),
            }
        )
    return rows


def gemv_model(report: dict) -> list[dict]:
    """Modelled GEMV time: the larger of its DRAM time (packed weight + scales + zeros) and its
    issue time (SASS per loop step, counted for each M, on the busiest SM)."""
    rows = []
    for dev in DEVICES:
        cfg = GEMV_CONFIGS[dev.cc // 10]
        for e in (e for e in report["gemv"] if e["cc"] == dev.cc):
            for k, n in ADALN_SHAPES:
                packed = n * k / 2 + 2 * 2 * n * k / 64  # codes + bf16 scales and zeros
                per_sm = math.ceil(triton.cdiv(n, cfg.block_n) / dev.sms)
                steps = triton.cdiv(k, GEMV_BLOCK_K)
                issue = per_sm * steps * e["loop_sass"] * cfg.num_warps / 4 / (dev.clock_ghz * 1e9)
                dram = packed / (dev.dram_gbs * 1e9)
                rows.append(
                    {
                        "device": dev.name,
                        "rows": e["rows"],
                        "k": k,
                        "n": n,
                        "mb": packed / 1e6,
                        "us_dram": dram * 1e6,
                        "us_issue": issue * 1e6,
                        "us": max(dram, issue) * 1e6,
                    }
                )
    return rows


def markdown(report: dict, table: list[dict], ceiling: list[dict], nbytes: dict, variants: list[dict]) -> str:
    """The section of docs/benchmarks.md, every figure labelled modelled or counted."""
    lines = [
        "Counted from the SASS (Triton " + triton.__version__ + "'s ptxas, no GPU):",
        "",
        "| kernel | arch | config (BM x BN, warps, stages[, conversion]) | regs | spills | SASS per loop | "
        "I2F in loop | "
        "narrowest load in loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report["gemm"]:
        lines.append(
            f"| w4a4_gemm {'u4' if e['unsigned'] else 's4'} (per 64-group) | sm_{e['cc']} | {e['config']}: "
            f"{e['block_m']}x{e['block_n']}, {e['num_warps']}, {e['num_stages']}"
            f"{', bias MMA' if e['bias_mma'] else ''} | "
            f"{e['regs']} | {e['spill_instrs']} | {e['loop_sass']} | {e['loop_i2f']} | "
            f"{e['loop_narrowest_load']} B |"
        )
    for e in report["act"]:
        lines.append(
            f"| quantize_act (per 64-group) | sm_{e['cc']} | {e['block_m']} rows, {e['num_warps']}, "
            f"{e['num_stages']} | {e['regs']} | {e['spill_instrs']} | {e['loop_sass']} | {e['loop_i2f']} | "
            f"{e['loop_narrowest_load']} B |"
        )
    for e in report["gemv"]:
        lines.append(
            f"| w4a16_gemv M={e['rows']} (per 256 channels) | sm_{e['cc']} | {e['block_n']} cols, "
            f"{e['num_warps']}, {e['num_stages']} | {e['regs']} | {e['spill_instrs']} | {e['loop_sass']} | "
            f"{e['loop_i2f']} | {e['loop_narrowest_load']} B |"
        )
    lines += [
        "",
        "Modelled at M = 4352 (not measured; cuBLAS bf16 modelled at "
        f"{CUBLAS_BF16_EFFICIENCY:.0%} of the dense bf16 peak):",
        "",
        "| device | K -> N | quantize_act us (DRAM floor) | w4a4_gemm us (CTAs/SM) | int8 peak fraction "
        "[serialized, overlapped] | cuBLAS bf16 us | pair vs bf16 [serialized, overlapped] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['device']} | {r['k']} -> {r['n']} | {r['act_us']:.1f} ({r['act_dram_floor_us']:.1f}) | "
            f"{r['gemm_us']:.0f} ({r['gemm_ctas_per_sm']}) | {r['gemm_int8_frac']:.0%} "
            f"[{r['gemm_int8_frac_serialized']:.0%}, {r['gemm_int8_frac_overlapped']:.0%}] | "
            f"{r['cublas_bf16_us']:.0f} | **{r['pair_vs_bf16']:.2f}x** "
            f"[{r['pair_vs_bf16_serialized']:.2f}, {r['pair_vs_bf16_overlapped']:.2f}] |"
        )
    lines += [
        "",
        "The modelled figure takes MMA and scaling as overlapped when two or more CTAs share an SM "
        "(one's MMA runs under another's scaling) and as serialized with one CTA per SM (its warpgroups "
        "meet at a barrier every group); the brackets give both bounds.",
        "",
        "Per-64-group scales on both operands, counted in the main loop:",
        "",
        "| device | conversion | SASS per loop | epilogue SASS per output element per group | all loop SASS "
        "per element | dot's share of the tensor work | int8 peak allowed by the epilogue (and that "
        "share) | by the whole loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in ceiling:
        lines.append(
            f"| {c['device']} | {c['conversion']} | {c['loop_sass']} | {c['epilogue_per_elem']:.1f} | "
            f"{c['sass_per_elem']:.1f} | {c['tensor_share']:.0%} | {c['ceiling_epilogue_only']:.0%} | "
            f"{c['ceiling_whole_loop']:.0%} |"
        )
    lines += [
        "",
        "Groups of 128 channels on both operands, modelled the same way (H100 SXM; compiled with the sm_90 "
        "config for that group size: 64x128, 4 warps, 4 stages, magic bits; quantize_act kept at its "
        "64-group time):",
        "",
        "| K -> N | regs | SASS per 64 channels | w4a4_gemm us | int8 peak fraction | pair vs bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        lines.append(
            f"| {v['k']} -> {v['n']} | {v['regs']} | {v['sass_per_64_channels']:g} | {v['gemm_us']:.0f} | "
            f"{v['int8_frac']:.0%} | **{v['pair_vs_bf16']:.2f}x** |"
        )
    if nbytes:
        w = nbytes["qweight"]
        sc = {key: nbytes[key] for key in ("wscales", "wzeros")}
        packed = w["bytes"] + sum(v["bytes"] for v in sc.values())
        unique = sum(v["unique"] for key, v in nbytes.items() if isinstance(v, dict) and "unique" in v)
        lines += [
            "",
            f"W4A16 GEMV, counted from the kernel's own loads (interpreter, GPU launch config, "
            f"M, K, N = {nbytes['shape']}): qweight {w['loaded']:,} B loaded of {w['bytes']:,}, "
            f"{'each byte exactly once' if w['loaded'] == w['unique'] == w['bytes'] else 'NOT each byte once'}; "
            f"scales + zeros {sum(v['loaded'] for v in sc.values()):,} B; unique bytes of all inputs "
            f"{unique:,} = {unique / packed:.3f}x the packed weight + scales + zeros.",
            "",
        ]
    lines += [
        "",
        "W4A16 GEMV, modelled (the larger of DRAM time and issue time on the busiest SM):",
        "",
        "| device | AdaLN K -> N | M | MB read | us at DRAM peak | us issue | modelled us |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in gemv_model(report):
        lines.append(
            f"| {r['device']} | {r['k']} -> {r['n']} | {r['rows']} | {r['mb']:.1f} | {r['us_dram']:.1f} | "
            f"{r['us_issue']:.1f} | {r['us']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md tables")
    parser.add_argument("--gemv-bytes-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-gemv-bytes", action="store_true", help="skip the interpreter byte count")
    args = parser.parse_args()
    if args.gemv_bytes_child:
        m, k, n = map(int, args.gemv_bytes_child.split(","))
        json.dump(gemv_bytes(m, k, n), sys.stdout)
        return 0
    report = static_report()
    bad = gate_failures(report)
    table = model_table(report)
    ceiling = scale_ceiling(report)
    variants = format_variants(table)
    nbytes = {} if args.no_gemv_bytes else gemv_bytes_subprocess(4, 3072, 512)
    full = {
        "static": report,
        "gates_failed": bad,
        "model": table,
        "scale_ceiling": ceiling,
        "format_variants": variants,
        "gemv_bytes": nbytes,
    }
    if args.json:
        args.json.write_text(json.dumps(full, indent=1))
    if args.markdown:
        print(markdown(report, table, ceiling, nbytes, variants))
    for line in bad:
        print("GATE FAILED:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
