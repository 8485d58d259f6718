"""Whether the current compile asked for autotuning (mode="max-autotune").

The backend sets it while it compiles; the kernel implementations read it when they pick
a tile config (autotune.py benchmarks candidates only when it is on)."""
from __future__ import annotations

import contextlib

_state = {"on": False}


def is_enabled() -> bool:
    return _state["on"]


@contextlib.contextmanager
def enabled(on: bool):
    old = _state["on"]
    _state["on"] = bool(on)
    try:
        yield
    finally:
        _state["on"] = old
