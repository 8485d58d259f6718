"""Autotuning of the Triton attention tiles (torch.compile mode="max-autotune").

The backend turns it on with `autotune.set_enabled(True)` (or `with autotune.enabled_ctx():`).
When on, the first call of each (spec, shape bucket, dtype, device capability) benchmarks the
candidate configs of codegen/triton_configs.py with triton.testing.do_bench on the real inputs
and keeps the fastest; winners are cached in memory and on disk as JSON
(`<cache_dir>/autotune.json`), so later processes skip the search.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading

import torch

from .codegen import triton_configs, triton_render
from .codegen.triton_configs import BwdConfig, FwdConfig
from .spec import AttentionSpec

log = logging.getLogger("fa3_inductor")
_enabled = os.environ.get("FA3_INDUCTOR_AUTOTUNE", "0") == "1"
_lock = threading.Lock()
_table: dict | None = None


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def enabled_ctx(flag: bool = True):
    old = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(old)


def _bucket(n: int) -> int:
    """Sequence lengths are bucketed to the next power of two: one search per bucket."""
    return 1 << max(0, (max(1, n) - 1).bit_length())


def _key(kind: str, q, k, v, spec: AttentionSpec) -> str:
    cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
    return "|".join([kind, spec.to_json(), f"sq{_bucket(q.shape[2])}", f"sk{_bucket(k.shape[2])}",
                     f"d{q.shape[3]}", f"dv{v.shape[3]}", f"g{q.shape[1] // k.shape[1]}",
                     str(q.dtype), f"sm{cap[0]}{cap[1]}"])


def _path():
    return triton_render.cache_dir().parent / "autotune.json"


def _load_table() -> dict:
    global _table
    if _table is None:
        try:
            _table = json.loads(_path().read_text())
        except (OSError, ValueError):
            _table = {}
    return _table


def _store(key: str, cfg) -> None:
    table = _load_table()
    table[key] = dataclasses.asdict(cfg)
    path = _path()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _search(key, cls, candidates, run):
    from triton.testing import do_bench
    with _lock:
        hit = _load_table().get(key)
        if hit is not None:
            return cls(**hit)
        best, best_ms = None, float("inf")
        for cfg in candidates:
            try:
                ms = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
            except Exception as exc:  # out of shared memory/registers for this shape: skip it
                log.debug("fa3 autotune: %s failed: %s", cfg, exc)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"fa3 autotune: no candidate config runs for {key}")
        log.info("fa3 autotune: %s -> %s (%.3f ms)", key, best, best_ms)
        _store(key, best)
        return best


def best_fwd(q, k, v, spec: AttentionSpec) -> FwdConfig:
    from .ops import triton_impl
    key = _key("fwd", q, k, v, spec)
    hit = _load_table().get(key)
    if hit is not None:
        return FwdConfig(**hit)
    cands = triton_configs.fwd_candidates(q.shape[3], v.shape[3], spec.causal)
    seed = torch.zeros(2, dtype=torch.int64, device=q.device)
    slopes = torch.zeros(q.shape[1], device=q.device)
    return _search(key, FwdConfig, cands, lambda c: triton_impl.forward(
        q, k, v, None, None, slopes, seed, 1.0, _probe_spec(spec), config=c))


def best_bwd(q, k, v, spec: AttentionSpec) -> BwdConfig:
    from .ops import triton_impl
    key = _key("bwd", q, k, v, spec)
    hit = _load_table().get(key)
    if hit is not None:
        return BwdConfig(**hit)
    cands = triton_configs.bwd_candidates(q.shape[3], v.shape[3], spec.causal)
    ps = _probe_spec(spec)
    seed = torch.zeros(2, dtype=torch.int64, device=q.device)
    slopes = torch.zeros(q.shape[1], device=q.device)
    out, lse = triton_impl.forward(q, k, v, None, None, slopes, seed, 1.0, ps)
    dout = torch.randn_like(out)
    return _search(key, BwdConfig, cands, lambda c: triton_impl.backward(
        dout, q, k, v, out, lse, None, None, slopes, seed, 1.0, ps, False, config=c))


def _probe_spec(spec: AttentionSpec) -> AttentionSpec:
    # Tensor operands (bias, padding) are not at hand during the search: tune the structural
    # part of the spec (window, softcap, alibi, dropout), which is what changes the kernel's cost.
    return spec.replace(mask_kind=None, key_padding=False)
