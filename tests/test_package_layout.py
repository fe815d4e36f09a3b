"""The package reads as the course: packages by concept, imports pointing one way, no circles."""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "distzo2_lab"

# Lowest first: a module may import only from its own layer or the layers before it.
LAYERS = [
    ["errors", "seeds", "config"],
    ["observe"],  # one span schema and its views: every layer below records into it
    ["models"],
    ["zo"],
    ["offload"],
    ["parallel"],
    ["data"],
    ["run"],
    ["plan"],
    ["bench", "hf"],  # hf: the toolkit behind transformers' Trainer (uses run/)
    ["cli", "demo", "__main__", "__init__"],
]


def _unit(module: str) -> str:
    """The layer unit of a dotted module name under distzo2_lab: its package or top-level module."""
    return module.split(".")[0]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of distzo2_lab it imports}, function-level imports included."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distzo2_lab"):
                assert node.level == 0, f"{name}: relative import; imports are absolute (distzo2_lab.x.y)"
                base = node.module[len("distzo2_lab."):] if node.module != "distzo2_lab" else ""
                targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
                targets = [t if t in mods else base for t in targets]
            elif isinstance(node, ast.Import):
                targets = [a.name[len("distzo2_lab."):] for a in node.names if a.name.startswith("distzo2_lab.")]
            deps.update(t for t in targets if t and t != name)
        graph[name] = deps
    return graph


def test_package_has_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d in graph and not state.get(d):
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_imports_follow_the_layer_order():
    rank = {u: i for i, units in enumerate(LAYERS) for u in units}
    graph = import_graph()
    unknown = sorted({_unit(m) for m in graph} - set(rank))
    assert not unknown, f"place these in LAYERS: {unknown}"
    upward = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
              if rank[_unit(d)] > rank[_unit(m)]]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_at_most_eight_modules_sit_directly_in_the_package():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert len(flat) <= 8, flat
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert {"zo", "offload", "parallel", "models", "data", "run", "observe", "plan", "bench"} <= set(packages)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a made-up graph with a circle and an upward edge trips them."""
    fake = {"zo.engine": {"run.train"}, "run.train": {"zo.engine"}}
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: fake)
    import pytest

    with pytest.raises(AssertionError, match="import circle"):
        test_package_has_no_import_circle()
    with pytest.raises(AssertionError, match="pointing up"):
        test_imports_follow_the_layer_order()
