"""The layering of docs/design.md (Layout), checked on the source: the four parts are libraries that import only the
shared core, and no module imports itself back through others (no import cycle at any level)."""

import ast
from pathlib import Path
from typing import Dict, Set

SRC = Path(__file__).resolve().parents[2] / "src" / "sturdy"
PARTS = ("lipschitz", "fourier", "flatness", "compression")
MAX_LINES = 450


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports() -> Dict[str, Set[str]]:
    """module -> sturdy modules it imports (at any place in the file, lazy imports included)."""
    graph: Dict[str, Set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: Set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # ``if TYPE_CHECKING:`` imports never run
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("sturdy"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.startswith("sturdy"):
                    targets.add(module)
                    targets.update(f"{module}.{a.name}" for a in node.names)
        graph[name] = targets
    modules = set(graph)
    return {m: {t for t in ts if t in modules and t != m} for m, ts in graph.items()}


def test_parts_import_only_the_core():
    for module, targets in _imports().items():
        part = module.split(".")[1] if module.count(".") >= 1 else ""
        if part not in PARTS:
            continue
        for target in targets:
            other = target.split(".")[1] if target.count(".") >= 1 else ""
            assert other not in set(PARTS) - {part}, f"{module} imports another part: {target}"
            assert other not in ("training", "experiments", "cli", "report"), f"{module} imports {target}"


def test_core_imports_no_part():
    core = {"sturdy.errors", "sturdy.utils", "sturdy.data", "sturdy.models",
            "sturdy.distributed", "sturdy.report", "sturdy.normalize", "sturdy.model_sources"}
    for module, targets in _imports().items():
        if module in core or module.startswith(("sturdy.persample", "sturdy.training")):
            for target in targets:
                assert target.split(".")[1] not in PARTS + ("experiments", "cli"), f"{module} imports {target}"


def test_no_import_cycle():
    graph = _imports()
    # Python initialises a module's parent packages before the module itself, and a package's
    # ``__init__`` re-exporting its own submodules is that same order: neither is a cycle.
    edges = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")}
             for m, ts in graph.items()}
    state: Dict[str, int] = {}
    stack = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_long_files_say_why():
    """A module over MAX_LINES lines must hold a single idea and say so in its docstring."""
    for path in SRC.rglob("*.py"):
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "single idea" in doc.lower(), f"{path.relative_to(SRC)} has {lines} lines and no 'single idea' note"
