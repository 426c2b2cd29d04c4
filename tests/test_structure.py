"""The shape of the code the architecture promises (docs/architecture.md):
imports flow one way and never in a circle, no module reaches for another's
private names, and no function grows past what a reader can see whole."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("orchestrator", "workloads")
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, str]:
    """dotted module name -> file path, for every module of our packages."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def _imports(module: str, path: str, modules: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(imported module of ours, names taken from it) for every import in the file,
    whether at module top or inside a function."""
    is_package = path.endswith("__init__.py")
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [alias.name for alias in node.names]
            # `from package import module` imports the module itself
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            found += [(s, []) for s in submodules]
            found.append((target, [n for n in names if f"{target}.{n}" not in modules]))
    return [(target, names) for target, names in found if target in modules]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        # a package's __init__ runs before its modules: importing a.b.c imports a and a.b
        graph[module] = {target for target, _ in _imports(module, path, modules) if target != module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way():
    graph = _graph()
    for module, targets in graph.items():
        for target in targets:
            if module.startswith("workloads"):
                assert not target.startswith("orchestrator"), f"{module} imports {target}: workloads never import the orchestrator"
            if module.startswith("workloads.core"):
                assert not target.startswith(("workloads.text", "workloads.controlled")), \
                    f"{module} imports {target}: the shared core imports neither family"
            if module.startswith("workloads.text"):
                assert not target.startswith("workloads.controlled"), f"{module} imports {target}"
            if module.startswith("workloads.controlled"):
                assert not target.startswith("workloads.text"), f"{module} imports {target}"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = [f"{module} takes {name} from {target}"
                 for module, path in modules.items()
                 for target, names in _imports(module, path, modules)
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert not offenders, offenders


def test_no_function_over_100_lines():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, long


def test_configs_and_registry_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, workloads; from orchestrator import spec; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_rl_algorithms_share_code_through_the_loop_not_each_other():
    """PPO/NLPO and the GRPO family each hold their math and their step; what they share lives in
    workloads/text/rl_loop.py (and below it), never in one another."""
    graph = _graph()
    algorithms = ("workloads.text.ppo", "workloads.text.nlpo", "workloads.text.grpo")
    for module in algorithms:
        assert "workloads.text.rl_loop" in graph[module] or module == "workloads.text.nlpo", module
        others = {a for a in algorithms if a != module} - ({"workloads.text.nlpo"} if module.endswith("ppo") else set())
        assert not graph[module] & others, f"{module} imports {graph[module] & others}"
