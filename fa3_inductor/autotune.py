"""Autotuning at run time (torch.compile(..., mode="max-autotune")).

A graph compiled with that mode carries `AttentionSpec.autotune` on each rewritten site (the
kernels run, and pick their configuration, when the graph runs); `set_enabled(True)`,
`enabled_ctx()` or FA3_INDUCTOR_AUTOTUNE=1 turn it on for every call instead.  When on, the
first call of each (spec, shape bucket, dtype, device capability) times, with
triton.testing.do_bench on the real inputs: the Triton tile candidates of
codegen/triton_configs.py (forward and backward), and under kernel "auto" the CUDA template
against the Triton one (best_impl).  Winners are cached in memory and on disk as JSON
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
    return "|".join([kind, spec.semantic_json(), f"sq{_bucket(q.shape[2])}", f"sk{_bucket(k.shape[2])}",
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
    _store_raw(key, dataclasses.asdict(cfg))


def _store_raw(key: str, entry: dict) -> None:
    table = _load_table()
    table[key] = entry
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


def best_impl(q, k, v, spec: AttentionSpec, impls: dict) -> str:
    """kernel "auto" under autotuning: which of `impls` (name -> implementation module, each of
    which supports the call) runs this forward fastest, timed once per spec and shape bucket on
    the real inputs and kept in the on-disk table.  Only calls both the CUDA and the Triton
    template support get here: no bias, padding, ALiBi or dropout operands to supply."""
    key = _key("impl", q, k, v, spec)
    with _lock:
        hit = _load_table().get(key)
    if hit is not None and hit.get("impl") in impls:
        return hit["impl"]
    from triton.testing import do_bench
    scale = q.shape[-1] ** -0.5
    times = {}
    for name, impl in impls.items():
        def run(impl=impl):
            return impl.forward(q, k, v, None, None, None, None, scale, spec)
        try:
            run()  # first call: builds the kernel (and tunes the Triton tiles) outside the timing
            times[name] = do_bench(run, warmup=5, rep=20, return_mode="median")
        except Exception as exc:  # a kernel that fails here is simply not chosen
            log.debug("fa3 autotune: %s failed for %s: %s", name, key, exc)
    if not times:
        return next(iter(impls))
    best = min(times, key=times.get)
    log.info("fa3 autotune: %s -> %s (%s)", key, best, ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    with _lock:
        _store_raw(key, {"impl": best, "ms": {n: round(t, 4) for n, t in times.items()}})
    return best


def _probe_spec(spec: AttentionSpec) -> AttentionSpec:
    # Tensor operands (bias, padding) are not at hand during the search: tune the structural
    # part of the spec (window, softcap, alibi, dropout), which is what changes the kernel's cost.
    return spec.replace(mask_kind=None, key_padding=False)
