"""The import graph of the lcrun package has no cycle (static: every import statement, including those inside
functions), and the layering holds: only lcrun.engine imports llama_cpp, only lcrun.ui rich, only lcrun.hub
huggingface_hub, and the converter nothing of the application; the layers cli -> launch -> generation -> engine are
imported downwards only, and ui/ renders without reaching what loads or runs a model."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lcrun": ROOT / "lcrun", "lcrun.convert": ROOT / "convert", "lcrun.models": ROOT / "models"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if "demo" in path.parts or "haystack" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module or "")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                yield target


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: set(imports_of(name, path, set(mods))) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    edges = graph()
    assert len(edges) > 40 and sum(map(len, edges.values())) > 100  # the walk finds the package
    assert cycles(edges) == []


def test_no_module_imports_the_command_line() -> None:
    # subcommands are found by name (lcrun.cli._Commands); parsers live in lcrun.param_types
    assert [name for name, targets in graph().items() if "lcrun.cli" in targets] == []


def test_the_cycle_check_finds_a_cycle() -> None:  # negative control
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def external_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_layering() -> None:
    # hub_tokenizer.py holds what no longer fits hub.py's 400 lines: the Hub's boundary is these two modules
    owners = {"llama_cpp": ("lcrun.engine",), "rich": ("lcrun.ui",),
              "huggingface_hub": ("lcrun.hub", "lcrun.hub_tokenizer"), "prometheus_client": ("lcrun.serve.metrics",)}
    for name, path in modules().items():
        used = external_imports(path)
        for library, allowed in owners.items():
            if library in used:
                assert any(name == owner or name.startswith(owner + ".") for owner in allowed), \
                    f"{name} imports {library}"
        if name.startswith("lcrun.convert"):
            assert not used & {"click", "rich", "llama_cpp", "huggingface_hub"}, name
            assert not any(t.startswith("lcrun.") and not t.startswith(("lcrun.convert", "lcrun.models"))
                           for t in imports_of(name, path, set(modules()))), name


# -- the layers: cli -> launch -> generation -> engine, and ui/ beside them, rendering --------------------------------
LAYERS = ("cli", "launch", "generation", "engine")   # a layer imports only the layers after it
UI_MAY_IMPORT = {"lcrun.engine.protocol", "lcrun.generation.records"}   # records the engine and the loop stream


def layer_of(name: str) -> str | None:
    if name in ("lcrun.cli", "lcrun.cli_options", "lcrun.param_types") or name.endswith("_cli"):
        return "cli"
    for layer in ("launch", "generation", "engine", "ui"):
        if name == f"lcrun.{layer}" or name.startswith(f"lcrun.{layer}."):
            return layer
    return None   # the rest (chat, serve, niah, planner, hub, …) sits beside the layers


def layer_breaches(edges: dict[str, set[str]]) -> list[str]:
    """Every import that goes up the layers, and every import by ui/ of what loads or runs a model: the engine but
    its protocol records, the generation loop but its records, the launch's loader, the command line."""
    found = []
    for module, targets in edges.items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here in LAYERS and there in LAYERS and LAYERS.index(there) < LAYERS.index(here):
                found.append(f"{module} -> {target} (up from {here} to {there})")
            if here == "ui" and target not in UI_MAY_IMPORT and (
                    there in ("engine", "generation", "cli") or target == "lcrun.launch.loaded"):
                found.append(f"{module} -> {target} (ui/ only renders)")
    return found


def test_the_layers_hold() -> None:
    edges = graph()
    assert any(layer_of(name) == "launch" for name in edges) and any(layer_of(name) == "ui" for name in edges)
    assert layer_breaches(edges) == []


def test_the_layer_check_finds_a_breach() -> None:  # negative control, on the real graph with one import added
    edges = graph()
    assert "lcrun.generation.records" in edges["lcrun.ui.chat_session_view"]        # allowed: the records
    edges["lcrun.ui.chat_session_view"] = {*edges["lcrun.ui.chat_session_view"], "lcrun.engine.runtime"}
    edges["lcrun.engine.runtime"] = {*edges["lcrun.engine.runtime"], "lcrun.launch.decide"}
    edges["lcrun.ui.launch_view"] = {*edges["lcrun.ui.launch_view"], "lcrun.launch.loaded"}
    assert sorted(layer_breaches(edges)) == [
        "lcrun.engine.runtime -> lcrun.launch.decide (up from engine to launch)",
        "lcrun.ui.chat_session_view -> lcrun.engine.runtime (ui/ only renders)",
        "lcrun.ui.launch_view -> lcrun.launch.loaded (ui/ only renders)",
    ]
