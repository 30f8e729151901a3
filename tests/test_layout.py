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
