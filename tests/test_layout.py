"""The shape of the code that the import contracts (setup.cfg, ``make lint``) cannot see: the
pure cores and the protocol open no file, whatever they import."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PURE = ("agent/core", "agent/protocol")
# calls that reach the file system: builtins, pathlib and os
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "unlink", "rmdir", "iterdir",
              "glob", "rglob", "stat", "exists", "is_file", "is_dir", "touch", "replace", "rename", "listdir",
              "makedirs", "remove", "scandir", "walk", "chmod", "fsync"}


def _modules(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (ROOT / r).rglob("*.py"))


def _file_calls(path: Path) -> list[str]:
    """``name (line)`` of every call in ``path`` that opens or touches a file; an in-memory
    archive (``tarfile.open(fileobj=...)``), ``str.replace(old, new)`` and
    ``datetime.replace(tzinfo=...)`` are not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name not in FILE_CALLS:
            continue
        if name == "open" and any(k.arg == "fileobj" for k in node.keywords):
            continue
        if name == "replace" and (len(node.args) != 1 or node.keywords):  # Path.replace(target) takes one
            continue
        found.append(f"{name} (line {node.lineno})")
    return found


def test_the_pure_cores_and_the_protocol_open_no_file() -> None:
    offenders = {str(p.relative_to(ROOT)): calls for p in _modules(*PURE) if (calls := _file_calls(p))}
    assert offenders == {}, "file I/O belongs in agent/adapters: " + repr(offenders)


def test_the_file_check_sees_file_access(tmp_path: Path) -> None:
    """The check itself finds what it looks for (a check that cannot fail proves nothing)."""
    sample = tmp_path / "sample.py"
    sample.write_text("import tarfile\nfrom pathlib import Path\n"
                      "def f(p):\n    return Path(p).read_text(), open(p), tarfile.open(fileobj=p), 'a'.replace('a', 'b')\n")
    assert _file_calls(sample) == ["read_text (line 4)", "open (line 4)"]


PACKAGES = ("vota", "agent", "tbox", "gateway", "ecu_sim", "cloud_sim")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
DECLARATIVE = {"vota/cli/parser.py"}  # the argument parser: one table per command


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    """(name, lines of its body without the docstring) of every function in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1
            start = body[1].lineno if docstring else body[0].lineno
            found.append((node.name, (node.end_lineno or start) - start + 1))
    return found


def test_modules_and_functions_stay_small() -> None:
    """A module does one thing (at most ~450 lines), a function fits on a screen (~60 lines)."""
    big = {str(p.relative_to(ROOT)): n for p in _modules(*PACKAGES) if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}, f"modules over {MAX_MODULE_LINES} lines: split them by responsibility"
    long = {f"{p.relative_to(ROOT)}:{name}": n for p in _modules(*PACKAGES) if str(p.relative_to(ROOT)) not in DECLARATIVE
            for name, n in _function_lengths(p) if n > MAX_FUNCTION_LINES}
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines"
