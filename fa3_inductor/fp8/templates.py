"""Load the FP8 Triton templates (kernels/triton/fp8_*.tmpl) as importable modules.

Triton's @jit reads a kernel's source with `inspect`, so the text has to live in a real
file: it is copied into a cache folder under a name derived from its hash and imported
from there.  The templates need no per-spec rendering (every spec choice is a
tl.constexpr), so the text is used as is.  Importing triton happens here, on first use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import sys
import tempfile

from ..kernels_path import read_template

_MODULES: dict = {}


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("FA3_INDUCTOR_CACHE") or os.path.join(tempfile.gettempdir(), f"fa3_inductor_{os.getuid()}")
    path = pathlib.Path(base) / "fp8"
    path.mkdir(parents=True, exist_ok=True)
    return path


def interpreting() -> bool:
    """Triton's CPU interpreter is on: the templates then work around its fp8/bf16 bugs."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load(name: str):
    """Module built from kernels/triton/<name>.tmpl (cached per process and on disk by content hash)."""
    mod = _MODULES.get(name)
    if mod is not None:
        return mod
    text = read_template(f"triton/{name}.tmpl")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    modname = f"fa3_fp8_{name}_{digest}"
    path = _cache_dir() / f"{modname}.py"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: concurrent ranks never import a half-written file
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    _MODULES[name] = mod
    return mod
