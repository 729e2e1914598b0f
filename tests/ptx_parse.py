"""PTX text -> a Kernel (instructions, labels, register widths, parameters), for tests/ptx_exec.py.

Reads one ``.entry`` function of a PTX module as ptxas-bound text from triton or nvcc: statements up
to ``;``, labels, predicate guards, vector and address operands, and the register declarations of
inline-asm scopes (``{ .reg .f32 a; ... }``), whose names are made unique per scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


class PtxError(RuntimeError):
    """The interpreter cannot go on (an unsupported instruction, a runaway loop, a bad launch)."""


@dataclass
class Instr:
    op: str  # the full opcode, e.g. "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"
    base: str  # "mma"
    mods: list[str]  # ["sync", "aligned", ...]
    args: list
    pred: tuple[str, bool] | None  # (register, negated)
    line: str


@dataclass
class Kernel:
    name: str
    params: list[tuple[str, str]]  # (name, type) in order
    instrs: list[Instr]
    labels: dict[str, int]
    widths: dict[str, int]  # register name or prefix -> bits (1 = predicate)
    shared_symbols: dict[str, tuple[int, int]]  # name -> (size, align); size 0 = extern
    branch_targets: dict[str, list[str]] | None = None  # ``L: .branchtargets a, b;`` lists (brx.idx)


_TYPE_BITS = {"pred": 1, "b8": 8, "s8": 8, "u8": 8, "b16": 16, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
              "b32": 32, "s32": 32, "u32": 32, "f32": 32, "f16x2": 32, "bf16x2": 32, "b64": 64, "s64": 64,
              "u64": 64, "f64": 64}  # fmt: skip


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = (line.split("//")[0] for line in text.splitlines())
    return "\n".join(line for line in lines if not re.match(r"\s*\.(loc|file)\b", line))


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _parse_operand(s: str, rename):
    s = s.strip()
    if s.startswith("{"):
        return ("vec", [_parse_operand(x, rename) for x in _split_args(s[1:-1])])
    if s.startswith("[") and "{" in s:  # a tensor operand: [tensor-map, {coordinates}]
        tmap, coords = _split_args(s[1:-1])
        return ("tensor", _parse_operand(tmap, rename), _parse_operand(coords, rename)[1])
    if s.startswith("["):
        inner = s[1:-1].replace(" ", "")
        m = re.fullmatch(r"([%\w$.]+)?(?:\+(-?(?:0x[0-9a-fA-F]+|\d+)))?", inner)
        if not m:
            raise PtxError(f"bad address {s}")
        base = m.group(1)
        off = int(m.group(2), 0) if m.group(2) else 0
        if base and base.startswith("%"):
            return ("addr", ("reg", rename(base)), None, off)
        return ("addr", None, base, off)
    if s == "_":
        return ("sink",)
    if s.startswith("!"):
        return ("not", _parse_operand(s[1:], rename))
    if s.startswith("%"):
        special = s in ("%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x", "%ctaid.y",
                        "%ctaid.z", "%nctaid.x", "%nctaid.y", "%nctaid.z", "%laneid", "%warpid", "%clock",
                        "%clock64", "%globaltimer")  # fmt: skip
        return ("special", s) if special else ("reg", rename(s))
    m = re.fullmatch(r"0([fF])([0-9a-fA-F]{8})|0([dD])([0-9a-fA-F]{16})", s)
    if m:
        return ("fimm", int(m.group(2), 16), 32) if m.group(1) else ("fimm", int(m.group(4), 16), 64)
    m = re.fullmatch(r"(-?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)[uU]?", s)
    if m:
        v = int(m.group(2), 16) if m.group(2).lower().startswith("0x") else int(m.group(2), 8 if
                                                                              m.group(2).startswith("0") and len(m.group(2)) > 1 else 10)  # fmt: skip
        return ("imm", -v if m.group(1) else v)
    if re.fullmatch(r"-?\d+\.\d*(e[-+]?\d+)?", s):
        return ("fimm", int(np.float64(float(s)).view(np.uint64)), 64)
    if re.fullmatch(r"[A-Za-z_$][\w$.]*", s):
        scoped = rename(s)  # an inline-asm block's own registers have no % sign
        return ("reg", scoped) if scoped != s else ("sym", s)
    raise PtxError(f"cannot parse operand {s!r}")


def parse(ptx: str, name: str | None = None) -> Kernel:
    """Parse the ``.entry`` function ``name`` (the first one if None) of a PTX module."""
    text = _strip_comments(ptx)
    shared_symbols: dict[str, tuple[int, int]] = {}
    for m in re.finditer(r"\.shared\s+(?:\.align\s+(\d+)\s+)?\.\w+\s+([\w$]+)\s*\[(\d*)\]", text):
        shared_symbols[m.group(2)] = (int(m.group(3) or 0), int(m.group(1) or 1))
    entries = list(re.finditer(r"\.entry\s+([\w$]+)\s*\(", text))
    if not entries:
        raise PtxError("no .entry in the PTX")
    em = next((e for e in entries if name is None or e.group(1) == name), None)
    if em is None:
        raise PtxError(f"no .entry {name}; have {[e.group(1) for e in entries]}")
    close = text.index(")", em.end())
    params = []
    for decl in text[em.end() : close].split(","):
        if decl.strip():
            words = decl.split()
            name, array = re.subn(r"\[\d+\]$", "", words[-1])
            # an array parameter (a TMA tensor map: .param .align 64 .b8 name[128]) takes a handle
            params.append((name, "u64" if array else next(w[1:] for w in words[1:] if w[1:] in _TYPE_BITS)))
    start = text.index("{", close)
    depth, i = 0, start
    while True:
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    body = text[start + 1 : i]
    shared_symbols = {k: v for k, v in shared_symbols.items() if re.search(rf"\b{re.escape(k)}\b", body)}

    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    widths: dict[str, int] = {}
    scopes: list[dict[str, str]] = [{}]
    counter = [0]
    branch_targets: dict[str, list[str]] = {}
    last_label = None

    def rename(reg: str) -> str:
        for sc in reversed(scopes):
            if reg in sc:
                return sc[reg]
        return reg

    for stmt in body.split(";"):
        s = stmt.strip()
        while True:
            if s.startswith("{"):
                scopes.append({})
                s = s[1:].strip()
            elif s.startswith("}"):
                scopes.pop()
                s = s[1:].strip()
            elif m := re.match(r"^([\w$]+):", s):
                name = m.group(1)
                if len(scopes) > 1:  # an inline-asm block's own label (several blocks reuse names)
                    counter[0] += 1
                    scopes[-1][name] = f"{name}@{counter[0]}"
                    name = scopes[-1][name]
                labels[name] = len(instrs)
                last_label = name
                s = s[m.end() :].strip()
            else:
                break
        if not s:
            continue
        if s.startswith(".branchtargets"):
            branch_targets[last_label] = [x.strip() for x in s[len(".branchtargets") :].split(",")]
            continue
        if s.startswith(".reg"):
            m = re.match(r"\.reg\s+\.(\w+)\s+(.*)", s, re.S)
            bits = _TYPE_BITS[m.group(1)]
            for decl in m.group(2).split(","):
                decl = decl.strip()
                if mm := re.fullmatch(r"(%?[\w$]+)<\d+>", decl):
                    widths[mm.group(1)] = bits
                else:
                    if len(scopes) > 1:
                        counter[0] += 1
                        new = f"{decl}@{counter[0]}"
                        scopes[-1][decl] = new
                        decl = new
                    widths[decl] = bits
            continue
        if s.startswith(
            (".local", ".shared", ".pragma", ".maxnreg", ".reqntid", ".maxntid", ".minnctapersm")
        ):
            if s.startswith(".local"):
                raise PtxError(f"local memory is not supported: {s}")
            continue
        pred = None
        if m := re.match(r"^@(!?)(%?[\w$@]+)\s+", s):
            pred = (rename(m.group(2)), m.group(1) == "!")
            s = s[m.end() :]
        m = re.match(r"^([\w.:]+)\s*(.*)$", s, re.S)
        op, rest = m.group(1), m.group(2).strip()
        parts = op.split(".")
        args = [_parse_operand(a, rename) for a in _split_args(rest)] if rest else []
        line = " ".join(stmt.split())
        instrs.append(Instr(op, parts[0], parts[1:], args, pred, line))
    instrs.append(Instr("exit", "exit", [], [], None, "<end of kernel>"))
    return Kernel(em.group(1), params, instrs, labels, widths, shared_symbols, branch_targets)
