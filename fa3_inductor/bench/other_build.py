"""Time the CUDA template against an earlier build of itself in the same run.

Between machine starts the same kernel reads 3-8% apart, more than most single changes gain, so a
template change is judged by timing both builds side by side: `kernels_from(dir)` makes the CUDA
paths (16-bit and FP8) load each instantiation from another kernel cache (the `cuda/` folder of an
earlier FA3_INDUCTOR_CACHE, e.g. the carried tarball of the previous sources) instead of this
checkout's build.  Benchmark-only: the product path always loads its own sources' build.
"""
from __future__ import annotations

import contextlib
import pathlib
import re

from ..codegen import cuda_jit


def _find(root: pathlib.Path, cfg) -> pathlib.Path:
    pat = re.compile(re.escape(cfg.name()) + r"_[0-9a-f]{24}\.so")
    hits = sorted(p for p in (root / "cuda").glob(f"{cfg.name()}_*.so") if pat.fullmatch(p.name))
    if len(hits) != 1:
        raise FileNotFoundError(f"{len(hits)} builds of {cfg.name()} in {root / 'cuda'} (need exactly one)")
    return hits[0]


@contextlib.contextmanager
def kernels_from(cache_root):
    """Inside the block, CUDA kernels come from cache_root's builds (never compiled)."""
    root = pathlib.Path(cache_root)
    saved = dict(cuda_jit._loaded)
    original = cuda_jit.compile_config
    cuda_jit._loaded.clear()
    cuda_jit.compile_config = lambda cfg, force=False: _find(root, cfg)
    try:
        yield
    finally:
        cuda_jit.compile_config = original
        cuda_jit._loaded.clear()
        cuda_jit._loaded.update(saved)


def interleaved(fns: dict, against: str | None, rounds: int, time_one) -> dict:
    """Median ms per name of fns (name -> zero-argument callable), each timed in turn `rounds`
    times.  With `against`, every name starting with "cuda" is also timed on that earlier build,
    as "<name> (earlier)", in the same rounds.  Each round starts one place further along the
    list, so that no variant always runs first or right after the same one (a fixed order read
    the same kernels up to 8-14% apart at long sequences: session 8, device run 1)."""
    import statistics
    runs = [(name, fn, None) for name, fn in fns.items()]
    if against:
        runs += [(f"{name} (earlier)", fn, against) for name, fn in fns.items() if name.startswith("cuda")]
    times: dict = {}
    missing = set()  # earlier-build runs of variants that build lacks (e.g. a new switch)
    for r in range(rounds):
        shift = r % len(runs)
        for name, fn, root in runs[shift:] + runs[:shift]:
            if name in missing:
                continue
            with (kernels_from(root) if root else contextlib.nullcontext()):
                try:
                    t = time_one(fn)
                except FileNotFoundError:
                    if not root:
                        raise
                    missing.add(name)
                    continue
            times.setdefault(name, []).append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}
