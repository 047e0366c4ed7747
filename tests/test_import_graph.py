"""The shape of albor's imports, read from the source with ``ast`` (nothing is imported).

* No cycle among albor's own modules. Imports inside functions count too: a
  lazy import only hides a cycle until the function first runs.
* Only ``albor/distributed/`` touches ``torch.distributed`` or ``deepspeed``,
  so the rest can be read, tested and changed without a process group.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "albor"
DISTRIBUTED = "albor.distributed"
FORBIDDEN = ("torch.distributed", "deepspeed")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_package(root: Path) -> dict[str, tuple[ast.Module, bool]]:
    """module name -> (syntax tree, is a package) for every .py file of albor under ``root``."""
    return {
        module_name(p, root): (ast.parse(p.read_text(encoding="utf-8"), filename=str(p)), p.name == "__init__.py")
        for p in sorted((root / PACKAGE).rglob("*.py"))
    }


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every dotted name the module imports, anywhere in it, absolute: (name, line).

    ``from a.b import c`` yields ``a.b.c`` (a submodule or a name in ``a.b``; the
    caller decides which), relative imports are resolved against ``module``.
    """
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [(f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno) for alias in node.names]
    return out


def internal_graph(modules: dict[str, tuple[ast.Module, bool]]) -> dict[str, dict[str, int]]:
    """module -> {albor module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, (tree, is_package) in modules.items():
        for name, line in imported_names(tree, module, is_package):
            # The longest prefix that is a module: ``from albor.data import builtin`` names the
            # submodule, ``from albor.data.loader import TrainLoader`` the module ``loader``.
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                graph[module].setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def forbidden_uses(modules: dict[str, tuple[ast.Module, bool]]) -> list[str]:
    """'module:line name' for each use of torch.distributed / deepspeed outside albor.distributed."""
    found = []
    for module, (tree, is_package) in modules.items():
        if module == DISTRIBUTED or module.startswith(DISTRIBUTED + "."):
            continue
        uses = imported_names(tree, module, is_package)
        # ``import torch`` then ``torch.distributed.foo()`` uses it without importing it.
        uses += [("torch.distributed", node.lineno) for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr == "distributed"
                 and isinstance(node.value, ast.Name) and node.value.id == "torch"]
        for name, line in uses:
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                found.append(f"{module}:{line} {name}")
    return found


# ---- the tree as it is ------------------------------------------------------------------------------


def test_albor_has_no_import_cycle() -> None:
    graph = internal_graph(parse_package(ROOT))
    assert len(graph) > 20 and graph["albor.data.prepare"]  # really read the tree
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in albor: {describe_cycle(cycle, graph)}"


def test_only_albor_distributed_uses_torch_distributed_or_deepspeed() -> None:
    modules = parse_package(ROOT)
    assert any(m.startswith(DISTRIBUTED + ".") for m in modules)
    found = forbidden_uses(modules)
    assert not found, "torch.distributed/deepspeed outside albor/distributed/: " + "; ".join(found)


def test_data_library_does_not_import_the_command_or_a_run() -> None:
    """Imports in albor.data run one way: library <- builtin <- prepare-data command; resolve and loader use the library."""
    graph = internal_graph(parse_package(ROOT))
    library = ["albor.data.corpus", "albor.data.corpus_jsonl", "albor.data.corpus_columnar", "albor.data.records",
               "albor.data.read_options", "albor.data.split", "albor.data.shards", "albor.data.tokenizer",
               "albor.data.tokenizing", "albor.data.unit_worker", "albor.data.spill", "albor.data.parts",
               "albor.data.staging", "albor.data.tokenizer_match", "albor.data.builtin", "albor.data.verify"]
    for module in library + ["albor.data.resolve", "albor.data.loader"]:
        assert "albor.data.prepare" not in graph[module], module
        assert "albor.cli" not in graph[module], module
    for module in library:
        assert not {"albor.data.resolve", "albor.data.loader"} & set(graph[module]), module


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_prepare_data_does_not_import_torch() -> None:
    """`albor prepare-data` runs on a machine set up for data work only, and starts in a second, not ten."""
    modules = parse_package(ROOT)
    graph = internal_graph(modules)
    closure = reachable(graph, "albor.data.prepare")
    assert "albor.data.tokenizing" in closure
    torch_users = []
    for m in sorted(closure):
        tree, is_package = modules[m]
        if any(name == "torch" or name.startswith("torch.") for name, _ in imported_names(tree, m, is_package)):
            torch_users.append(m)
    assert not torch_users, f"albor prepare-data imports torch through {torch_users}"


# ---- the checks themselves, on small made-up packages ----------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / PACKAGE / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize("files,expected", [
    # module level, through ``from package import submodule``
    ({"__init__.py": "", "a.py": "from albor import b\n", "b.py": "import albor.a\n"}, ["albor.a", "albor.b", "albor.a"]),
    # inside a function, relative, three modules
    ({"__init__.py": "", "p/__init__.py": "", "p/a.py": "def f():\n    from .b import x\n",
      "p/b.py": "from albor.p.c import y\n", "p/c.py": "from ..p import a\n"},
     ["albor.p.a", "albor.p.b", "albor.p.c", "albor.p.a"]),
])
def test_a_cycle_is_found_and_named(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    graph = internal_graph(parse_package(write_package(tmp_path, files)))
    cycle = find_cycle(graph)
    assert cycle == expected
    assert describe_cycle(cycle, graph).startswith(f"{expected[0]} (line ")


def test_one_way_imports_are_no_cycle(tmp_path: Path) -> None:
    files = {"__init__.py": "", "a.py": "from albor.b import x\nimport torch\n", "b.py": "import json\n",
             "c.py": "def f():\n    from albor import a, b\n"}
    assert find_cycle(internal_graph(parse_package(write_package(tmp_path, files)))) is None


def test_torch_distributed_outside_distributed_is_found(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "ok.py": "import torch\nx = torch.cuda.is_available()\n",
        "distributed/__init__.py": "import deepspeed\nimport torch.distributed as dist\n",
        "a.py": "import torch.distributed as dist\n",
        "b.py": "def f():\n    from deepspeed.runtime import zero\n",
        "c.py": "import torch\n\n\ndef f():\n    return torch.distributed.get_rank()\n",
        "d.py": "from torch import distributed\n",
    }
    found = forbidden_uses(parse_package(write_package(tmp_path, files)))
    assert found == ["albor.a:1 torch.distributed", "albor.b:2 deepspeed.runtime.zero",
                     "albor.c:5 torch.distributed", "albor.d:1 torch.distributed"]
