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


#: The rooms from the bottom up (docs/ARCHITECTURE.md): a module may import its own room and any row
#: BELOW it, never one above; two rooms on one row are siblings and never import each other. A room is a
#: tuple of module-name prefixes (``core`` alone is core/__init__.py); the longest prefix that matches wins.
LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("core", "core.errors", "core.features", "core.device"),),  # small utilities every room may use
    (("core.stores", "core.progress"),),  # files on disk: the stores, run directories, a job's progress record
    (("core.physics",),),  # torch on the maps, no Sionna
    (("core.raytracing",), ("core.learning",)),  # Sionna's side and the network's side
    (("core.reports",),),  # bring your own measurements: the report format, its checks, localizing a file
    (("core.jobs",),),  # launches the commands as processes
    (("core.benchmarks",), ("core.viz",)),
    (("core.cli", "core.__main__", "app", "app_widgets", "pages"),),  # the entry points: the CLI and the app
)

#: Upward imports that stay, each one-way and named here with its reason (both are in docs/ARCHITECTURE.md).
ALLOWED_UPWARD = {
    # a run directory's config.yaml is read back as the validated training Config; learning/config.py
    # itself imports only the bottom room (checked below), so no path leads back up through it
    ("core.stores.run", "core.learning.config"),
    # the app's workspace lists the scene catalogue and caches a scene's geometry (read in a subprocess)
    ("core.stores.workspace", "core.raytracing.scenes"),
}


def _room(module: str) -> tuple[int, int] | None:
    """``(row in LAYERS, room in the row)`` of ``module``, or None when no room holds it."""
    best = None
    for row, rooms in enumerate(LAYERS):
        for i, prefixes in enumerate(rooms):
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[2]):
                    best = (row, i, len(prefix))
    return None if best is None else best[:2]


def _wrong_way(module: str, source: str) -> list[str]:
    """Every import in ``source`` (of ``module``), at any depth (lazy ones in functions too), that goes to a
    room above ``module``'s or to a sibling room on its row: ``"module:line -> target"``."""
    here = _room(module)
    bad = []
    for node in ast.walk(ast.parse(source)):
        targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        if isinstance(node, ast.ImportFrom) and node.module == "core":  # ``from core import progress``
            targets = [f"core.{a.name}" if _room(f"core.{a.name}") != _room("core") else "core" for a in node.names]
        for target in targets:
            there = _room(target)
            if there is None or here is None or (module, target) in ALLOWED_UPWARD:
                continue
            if there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                bad.append(f"{module}:{node.lineno} -> {target}")
    return bad


def _all_sources() -> dict[str, Path]:
    """Every module of the project by name: core, the pages, the app and its widgets."""
    files = [*CORE.rglob("*.py"), *(REPO_ROOT / "pages").glob("*.py"), REPO_ROOT / "app.py", REPO_ROOT / "app_widgets.py"]
    return {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def test_every_module_lives_in_a_room():
    assert [m for m in _all_sources() if _room(m) is None] == []


def test_imports_go_down_the_rooms_only():
    bad = [hit for module, path in _all_sources().items() for hit in _wrong_way(module, path.read_text())]
    assert not bad, "imports against the direction of docs/ARCHITECTURE.md: " + "; ".join(bad)


def test_the_allowed_upward_imports_are_still_there_and_lead_nowhere_further():
    sources = _all_sources()
    for module, target in ALLOWED_UPWARD:
        found = {dep for dep, _ in _imports(sources[module], _modules())}
        assert target in found, f"{module} no longer imports {target}: drop it from ALLOWED_UPWARD"
    config_deps = {dep for dep, _ in _imports(sources["core.learning.config"], _modules())}
    assert all(_room(dep)[0] == 0 for dep in config_deps), config_deps


def test_the_direction_check_sees_lazy_and_sibling_imports():
    lazy = "def f():\n    from core.learning.inference import load_run\n"
    assert _wrong_way("core.physics.likelihood", lazy) == ["core.physics.likelihood:2 -> core.learning.inference"]
    assert _wrong_way("core.raytracing.generation", "import core.learning.model\n") != []  # a sibling room
    assert _wrong_way("core.learning.training", "from core import progress\n") == []  # down to core.progress
    assert _wrong_way("core.stores.run", "from core import progress\nimport core.jobs.manager\n") == [
        "core.stores.run:2 -> core.jobs.manager"]
    assert _wrong_way("pages.training", "from core.learning.inference import load_run\n") == []


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
