"""Every module of the package imports with only the core dependencies installed; the package's
import graph, read from the source, has no circle and its arrows point one way, down the layers."""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import dpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(dpo.__path__, prefix="dpo."))
PACKAGE = Path(dpo.__file__).parent

# The layers of the flow, bottom up: a module may import only from its own layer or a lower one.
# Within layer 0 the stages are peers that do not import each other (paths excepted, below them).
LAYERS = [
    ("paths", ["dpo.paths"]),
    ("data, loss, demo", ["dpo.data", "dpo.loss", "dpo.demo", "dpo.textbook"]),
    ("config", ["dpo.config"]),
    ("model", ["dpo.model"]),
    ("train", ["dpo.train"]),
    ("eval", ["dpo.eval"]),
    ("online", ["dpo.online"]),
    ("commands", ["dpo", "dpo.evaluate", "dpo.plot"]),
]
PEERS = 1  # the layer whose stages may not import each other


def test_package_has_the_core_modules():
    assert {"dpo.loss", "dpo.model.logprobs", "dpo.model.forward", "dpo.model.probes"} <= set(
        MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_import_dpo_loads_no_submodule_until_an_entry_point_is_used():
    import subprocess
    import sys

    code = ("import sys, dpo; before = sorted(m for m in sys.modules if m.startswith('dpo.')); "
            "from dpo import dpo_loss, concatenated_forward, chunked_sequence_logps; "
            "import dpo.loss, dpo.model.forward, dpo.model.logprobs; "
            "assert dpo_loss is dpo.loss.dpo_loss; "
            "assert concatenated_forward is dpo.model.forward.concatenated_forward; "
            "assert chunked_sequence_logps is dpo.model.logprobs.chunked_sequence_logps; "
            "print(before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'forward'"):
        dpo.__getattr__("forward")


# --- The import graph, from the source --------------------------------------------------------

def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file, for every module and package of `dpo/`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dpo modules it imports, at module level or inside functions, absolute or
    relative; `from pkg import name` counts as `pkg.name` when that is a module, else `pkg`."""
    def known(name):  # the longest prefix of `name` that is a module of the package
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    edges.add(known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in files
                              else known(base))
        graph[name] = {e for e in edges if e and e != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the path, "done" once all it reaches is explored

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [module, target]
            if target not in state and (circle := visit(target, path + [module])):
                return circle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module, [])):
            return circle
    return None


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, stage): the stage is the layer's entry the module belongs to."""
    best = None
    for index, (_, stages) in enumerate(LAYERS):
        for stage in stages:
            if module == stage or module.startswith(stage + ".") and stage != "dpo":
                if best is None or len(stage) > len(best[1]):
                    best = (index, stage)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: place it there")
    return best


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            (low, stage), (high, target_stage) = layer_of(module), layer_of(target)
            if high > low or high == low == PEERS and stage != target_stage:
                wrong.append(f"{module} ({LAYERS[low][0]}) imports {target} "
                             f"({LAYERS[high][0]})")
    return wrong


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    root = tmp_path / "dpo"
    (root / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "a.py": "import dpo.sub.d.e\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from . import c\n",
        "sub/c.py": "from ..a import x\nfrom dpo.sub import d\n",
        "sub/d.py": "import os\nfrom dpo import sub\n",
    }
    for name, text in sources.items():
        (root / name).write_text(text)
    graph = import_graph(module_files(root))
    assert graph == {"dpo": set(), "dpo.a": {"dpo.sub.d"}, "dpo.sub": set(),
                     "dpo.sub.b": {"dpo.sub.c"}, "dpo.sub.c": {"dpo.a", "dpo.sub.d"},
                     "dpo.sub.d": {"dpo.sub"}}
    assert find_circle(graph) is None
    graph["dpo.sub.d"].add("dpo.sub.b")  # through b's import inside a function
    assert find_circle(graph) == ["dpo.a", "dpo.sub.d", "dpo.sub.b", "dpo.sub.c", "dpo.a"]


def test_no_import_circle_in_the_package():
    graph = import_graph(module_files())
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_point_down_the_layers():
    wrong = upward_arrows(import_graph(module_files()))
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_an_upward_or_sideways_import_is_named():
    graph = {"dpo.loss": {"dpo.model.forward", "dpo.data"}, "dpo.model.forward": {"dpo.paths"}}
    assert upward_arrows(graph) == ["dpo.loss (data, loss, demo) imports dpo.data (data, loss, "
                                    "demo)", "dpo.loss (data, loss, demo) imports "
                                    "dpo.model.forward (model)"]


def test_the_loop_the_modules_and_the_readme_stay_readable_sizes():
    """train.py reads top to bottom in ≤ 200 lines, no module of the package or bench/ passes
    300, and the README stays ≤ 200 lines (the rest lives in docs/)."""
    root = PACKAGE.parent
    sizes = {p.relative_to(root): len(p.read_text().splitlines())
             for p in [*PACKAGE.rglob("*.py"), *(root / "bench").rglob("*.py")]}
    assert not {p: n for p, n in sizes.items() if n > 300}
    assert len((root / "train.py").read_text().splitlines()) <= 200
    assert len((root / "README.md").read_text().splitlines()) <= 200
