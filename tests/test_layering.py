"""One owner per concept, checked: engine/ has no import cycles (lazy imports inside functions
count), the numerics import no kernels, nothing in engine/ imports cog, kernels know no model."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in ENGINE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The engine modules ``path`` imports, anywhere in the file (names resolved to modules)."""
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports are for annotations, not run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _is_own_package(src: str, dst: str) -> bool:
    """A package's __init__ importing its own submodules (to re-export them) is not a cycle edge."""
    return MODULES[src].name == "__init__.py" and dst.startswith(src + ".")


def test_engine_has_no_import_cycles():
    edges = {m: {d for d in ds if not _is_own_package(m, d)} for m, ds in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d] if d in stack else [m, d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_numerics_import_no_kernels_and_engine_imports_no_cog():
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, engine.quant; print(sorted(m for m in sys.modules if m.startswith('engine')))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    assert "engine.kernels" not in res.stdout, res.stdout
    for m, deps in GRAPH.items():
        if m.startswith("engine.quant"):
            assert not any(d.startswith("engine.kernels") for d in deps), (m, deps)
        if m.startswith("engine.kernels"):
            assert not any(
                d.startswith(("engine.flux", "engine.modules", "engine.lora", "engine.service")) for d in deps
            ), (m, deps)
        source = MODULES[m].read_text()
        assert "import cog" not in source and "from cog" not in source, m
