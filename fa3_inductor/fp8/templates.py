"""Load the FP8 Triton templates (kernels/triton/fp8_*.tmpl) as importable modules.

Triton's @jit reads a kernel's source with `inspect`, so the text has to live in a real
file: it is copied into a cache folder under a name derived from its hash and imported
from there.  The templates need no per-spec rendering (every spec choice is a
tl.constexpr), so the text is used as is.  Importing triton happens here, on first use.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

from ..kernels_path import read_template

_MODULES: dict = {}


from ..codegen.source_cache import cache_root, import_source  # noqa: E402


def _cache_dir() -> pathlib.Path:
    return cache_root("fp8")


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
    mod = import_source(_cache_dir() / f"{modname}.py", text, modname)
    _MODULES[name] = mod
    return mod
