"""The house rules of docs/ARCHITECTURE.md, checked on the source tree (static, no imports)."""

import ast
from pathlib import Path

from core import REPO_ROOT

CORE = REPO_ROOT / "core"
MAX_FUNCTION_LINES = 85


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in CORE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """``(module, name)`` pairs of every ``core`` import in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "core":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full, None) if full in modules else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "core"]
    return found


def test_core_never_imports_streamlit():
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "streamlit" for n in names), path


def test_no_import_circle_between_core_modules():
    modules = _modules()
    graph = {m: {dep for dep, _ in _imports(p, modules) if dep in modules and dep not in (m, "core")}
             for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join(stack[stack.index(dep):] + [dep])
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    offenders = [f"{p.relative_to(REPO_ROOT)}: {mod}.{name}"
                 for p in [*CORE.rglob("*.py"), *(REPO_ROOT / "pages").glob("*.py"), REPO_ROOT / "app_widgets.py"]
                 for mod, name in _imports(p, modules) if name and name.startswith("_")]
    assert not offenders, offenders


def test_functions_are_short():
    long = []
    for path in [*CORE.rglob("*.py"), *(REPO_ROOT / "pages").glob("*.py"), REPO_ROOT / "app_widgets.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_repo_root_is_defined_once():
    places = [str(p.relative_to(REPO_ROOT)) for p in [*CORE.rglob("*.py"), *(REPO_ROOT / "pages").glob("*.py"),
                                                       REPO_ROOT / "app_widgets.py"]
              if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "REPO_ROOT" for t in n.targets)
                     for n in ast.walk(ast.parse(p.read_text())))]
    assert places == ["core/__init__.py"]


def test_pages_read_configs_through_core_not_raw_yaml():
    for path in [*(REPO_ROOT / "pages").glob("*.py"), REPO_ROOT / "app_widgets.py", REPO_ROOT / "app.py"]:
        imported = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        assert "yaml" not in imported, path
