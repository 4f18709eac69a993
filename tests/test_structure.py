"""The house rules of issue 21, checked on the source: no import circle, short files, a CLI that starts
on the standard library, and imports at module level unless a cycle or a heavy dependency forces them
into a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mixmodal"
MAX_LINES = 500
# files allowed past MAX_LINES, each with its reason (none today)
LONG_FILES: dict[str, str] = {}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import statement loads: mixmodal modules by full name, others by top-level name."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package of `module`
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    out = [base]
    out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]  # submodules by name
    return out


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str) -> tuple[set[str], list[tuple[int, list[str]]]]:
    """(what `module` imports when it loads, [(line, targets) of each import statement inside a function])."""
    tree = ast.parse(MODULES[module].read_text())
    top: set[str] = set()
    late: list[tuple[int, list[str]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only, never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    late.append((child.lineno, _targets(child, module)))
                else:
                    top.update(_targets(child, module))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, late


IMPORTS = {m: _imports(m) for m in MODULES}


def _parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


def _edges(module: str) -> set[str]:
    """The mixmodal modules `module` runs when it loads; its own packages are already loading."""
    return {p for t in IMPORTS[module][0] if t.startswith("mixmodal") for p in _parents(t)
            if p != module and not module.startswith(p + ".")}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_edges(m))
    return seen


def _third_party(module: str) -> set[str]:
    """The third-party packages `module` loads at import, directly or through other mixmodal modules."""
    names = {t.split(".")[0] for m in _closure(module) for t in IMPORTS[m][0]}
    return {n for n in names if n and n != "mixmodal" and n not in sys.stdlib_module_names and n != "__future__"}


def test_no_import_circle():
    """No mixmodal module reaches itself through module-level imports (function-level ones break cycles
    on purpose, with a comment; TYPE_CHECKING blocks never run)."""
    cycles = []
    for module in MODULES:
        for dep in _edges(module):
            if module in _closure(dep):
                cycles.append(f"{module} -> {dep}")
    assert not cycles, f"import circles (move one side into the function that needs it, with a comment): {cycles}"


def test_files_are_short():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    unexplained = {f: n for f, n in long.items() if f not in LONG_FILES}
    assert not unexplained, f"files over {MAX_LINES} lines (split them, or give the reason in LONG_FILES): {unexplained}"


def test_imports_inside_functions_have_a_reason():
    """An import of a mixmodal module inside a function is there because the target imports this module
    (a cycle), or because it loads a third-party package this module does not (torch, scipy, ...: the
    CLI starts on the standard library, `mixmodal.weights` keeps torch out of the text tokenizer).
    Anything else belongs at the top of the file, where readers and tools see the structure."""
    needless = []
    for module in MODULES:
        own = _third_party(module)
        for line, targets in IMPORTS[module][1]:
            ours = {p for t in targets if t.startswith("mixmodal.") for p in _parents(t)} - set(_parents(module))
            if not ours:
                continue
            cycle = any(module in _closure(p) for p in ours)
            heavier = any(_third_party(p) - own for p in ours)
            if not (cycle or heavier):
                needless.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} {', '.join(targets)}")
    assert not needless, f"function-level imports with neither a cycle nor a heavy dependency: {needless}"


def test_rules_see_what_they_check():
    """The checks above find imports at all: a known cycle breaker and a known heavy import."""
    late = {t for _, targets in IMPORTS["mixmodal.model.io"][1] for t in targets}
    assert "mixmodal.model.lora" in late and "mixmodal.model.io" in _closure("mixmodal.model.lora")
    assert "torch" in _third_party("mixmodal.train.trainer") and "torch" not in _third_party("mixmodal.cli")
    assert "mixmodal.config" in _edges("mixmodal.train.run")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"]])
def test_cli_starts_on_the_standard_library(argv):
    """Building the parser and printing help load no third-party package (no torch, numpy, yaml)."""
    code = ("import contextlib, io, sys; before = {m.split('.')[0] for m in sys.modules}\n"
            "from mixmodal.cli import build_parser\n"
            f"try:\n    with contextlib.redirect_stdout(io.StringIO()):\n        build_parser().parse_args({argv!r})\n"
            "except SystemExit:\n    pass\n"
            "mods = {m.split('.')[0] for m in sys.modules}\n"
            "print(sorted(m for m in mods - before - set(sys.stdlib_module_names) if m != 'mixmodal'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
