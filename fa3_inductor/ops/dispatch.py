"""Which implementation runs a given call: the reference, a Triton template or a CUDA template.

Implementations are modules with `forward`, `backward` (see contract.py) and
`supports(q, k, v, bias, spec) -> str | None` (None = supported, else the reason why not).
They are imported lazily so that CPU-only installs never touch Triton or nvcc.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from .. import config
from .signature_cache import SignatureCache, tensor_key

log = logging.getLogger("fa3_inductor")

_IMPL_MODULES = {
    "reference": "fa3_inductor.ops.reference_impl",
    "triton": "fa3_inductor.ops.triton_impl",
    "cuda": "fa3_inductor.ops.cuda_impl",
    "fp8": "fa3_inductor.fp8.attention",
}
_loaded: dict = {}
_warned: set = set()


def implementation(name: str):
    mod = _loaded.get(name)
    if mod is None:
        mod = importlib.import_module(_IMPL_MODULES[name])
        _loaded[name] = mod
    return mod


def hopper_available(device: torch.device | None = None) -> bool:
    if not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) == (9, 0)


def _kernel_order(kernel: str, q, k, v, spec) -> list[str]:
    if kernel == "auto":
        from ..codegen.cuda_jit import block_m_for
        from .cuda_impl import _shared_kv_head, packed_gqa_rows
        from .kernel_table import triton_first
        # Short GQA queries: the CUDA template packs a group's query heads into one tile, where
        # the Triton template runs a mostly empty tile per head (cuda_rows --decode measures it).
        # Counted on the kv heads the launch sees (an expand()ed K/V is one shared head).
        hk = _shared_kv_head(k, v)[0].shape[1]
        packs = packed_gqa_rows(q, hk, spec, block_m_for(q.shape[-1])) > 0
        if not packs and triton_first(q.shape[-1], k.shape[2], spec.window_right is not None):
            return ["triton", "cuda"]
        return ["cuda", "triton"]
    return [kernel]


def kernel_setting(spec) -> str:
    """The kernel a call runs with: its site's compile setting (AttentionSpec.kernel), else
    config.kernel at run time (a spec made outside a compile)."""
    return spec.kernel or config.kernel


def _autotune_on() -> bool:
    from .. import autotune
    return autotune.enabled()


def choose_forward(q, k, v, bias, spec):
    """The forward of an fp8 spec runs the FP8 kernel where it supports the call (remembered per
    call signature, as choose() does)."""
    if not spec.fp8:
        return choose(q, k, v, bias, spec)
    return remembered("fp8-forward", q, k, v, bias, spec, kernel_setting(spec),
                      lambda: _choose_fp8_forward(q, k, v, bias, spec))


def name_of(impl) -> str:
    """The name an implementation module is registered under ("cuda", "triton", "fp8", ...)."""
    return next(name for name, path in _IMPL_MODULES.items() if path == impl.__name__)


def _choose_fp8_forward(q, k, v, bias, spec):
    if q.device.type == "cuda" and hopper_available(q.device):
        try:
            impl = implementation("fp8")
            why_not = impl.supports(q, k, v, bias, spec)
        except Exception as exc:  # noqa: BLE001 - a broken optional path falls back, loudly once
            why_not = f"unavailable ({exc})"
        if why_not is None:
            return impl
        key = ("fp8", why_not)
        if key not in _warned:
            _warned.add(key)
            log.warning("fa3: fp8 requested but not used for this call: %s", why_not)
    return choose(q, k, v, bias, spec)


def _call_key(q, k, v, bias, spec, kernel):
    """Everything the implementations' supports() look at: dtypes, shapes, strides, 16-byte
    alignment of the data (TMA), the bias layout, the spec and the kernel choice."""
    tail = None if bias is None else (bias.dtype, tuple(bias.shape), bias.stride())
    return (kernel, spec, q.device, tensor_key(q), tensor_key(k), tensor_key(v), tail,
            os.environ.get("FA3_DISABLE_CUDA", ""))


_memo = SignatureCache()


def choose(q, k, v, bias, spec, *, kernel: str | None = None):
    """Pick the implementation for this call (run time, concrete tensors).  Decisions are
    remembered per call signature (_call_key): the supports() chain runs once per signature,
    not on every call of a training step (measured: host time bounds small attention calls)."""
    kernel = kernel or kernel_setting(spec)
    return remembered("impl", q, k, v, bias, spec, kernel, lambda: _choose(q, k, v, bias, spec, kernel))


def remembered(what: str, q, k, v, bias, spec, kernel: str, decide):
    """decide() once per (what, call signature), then its remembered answer: for the decisions a
    forward makes on every call (which implementation, which FP8 kernel)."""
    return _memo.get_or_build((what,) + _call_key(q, k, v, bias, spec, kernel), decide)


def _choose(q, k, v, bias, spec, kernel: str):
    if q.device.type != "cuda" or kernel == "reference" or not hopper_available(q.device):
        return implementation("reference")
    # kernel "auto" compiled with mode="max-autotune": time the kernels that support the call
    # instead of trusting the measured table's order (autotune.best_impl, cached on disk).
    tune = kernel == "auto" and (spec.autotune or _autotune_on())
    reasons, found = [], {}
    for name in _kernel_order(kernel, q, k, v, spec):
        try:
            impl = implementation(name)
        except Exception as exc:  # an implementation that cannot load (no nvcc, no triton) is skipped
            reasons.append(f"{name}: unavailable ({exc})")
            continue
        why_not = impl.supports(q, k, v, bias, spec)
        if why_not is None:
            if not tune:
                return impl
            found[name] = impl
            continue
        reasons.append(f"{name}: {why_not}")
    if len(found) > 1:
        from .. import autotune
        return found[autotune.best_impl(q, k, v, spec, found)]
    if found:
        return next(iter(found.values()))
    key = (kernel, tuple(reasons))
    if key not in _warned:
        _warned.add(key)
        log.warning("fa3: no fused kernel for this call (%s); running the reference", "; ".join(reasons))
    return implementation("reference")
