"""Rendered kernel sources on disk: one cache root, atomic publication, import by path.

Triton reads a @triton.jit function's source through `inspect`, so rendered templates must
live in real files; several processes (DDP ranks, pytest workers) may render the same one,
hence the write-to-temp-then-rename."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import tempfile
import types


def cache_root(sub: str) -> pathlib.Path:
    """$FA3_INDUCTOR_CACHE/<sub> or ~/.cache/fa3_inductor/<sub>, created."""
    root = os.environ.get("FA3_INDUCTOR_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "fa3_inductor"
    path = base / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


def import_source(path: pathlib.Path, text: str, module_name: str) -> types.ModuleType:
    """Write `text` to `path` unless it is already there, then import it as `module_name`."""
    if not path.exists() or path.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod
