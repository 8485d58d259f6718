"""Triton implementation of the attention op (contract: ops/contract.py).

Kernels come from kernels/triton/*.py.tmpl rendered per AttentionSpec
(codegen/triton_render.py); tiles from codegen/triton_configs.py or, in max-autotune mode,
from autotune.py.  Works on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).

Layout requirements: q, k, v, dout may have any strides except that the last (head) dim must
be contiguous; otherwise a contiguous copy is made here (one extra pass over that tensor).

Forward on sm_90: the Gluon kernel (ops/gluon_fwd.py, kernels/triton/gluon_fwd.py.tmpl) runs
every call gluon_supports() accepts (head dim 128 or 256, fp16/bf16, no mask or causal, no
bias / padding / ALiBi / softcap / dropout, TMA-readable strides, default tiles); everything
else runs the tl-level template (attn_fwd.py.tmpl).  Backward on sm_90: the Gluon kernel (ops/gluon_bwd.py,
kernels/triton/gluon_bwd.py.tmpl) runs every call gluon_bwd_supports() accepts: head dims 64, 128,
256 with deterministic_backward=False (atomic dQ); deterministic (the default) only where it
measured faster (deterministic_tl_reason); the same rules otherwise.  Everything else runs the tl
templates (attn_bwd.py.tmpl).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib

import torch

from .. import config as fa3_config
from ..codegen import triton_configs, triton_render
from ..spec import AttentionSpec
from .signature_cache import SignatureCache, tensor_key

_DTYPES = (torch.float16, torch.bfloat16)


def supports(q, k, v, bias, spec: AttentionSpec):
    """None when the Triton kernels run this call, else the reason why not."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not CUDA tensors"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (needs fp16 or bf16, all the same)"
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} > 256"
    if k.shape[-1] != q.shape[-1]:
        return "q and k head dims differ"
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        return "query heads not a multiple of kv heads"
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "needs sm_80 or newer"
    if spec.out_torch_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"out dtype {spec.out_dtype}"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # pragma: no cover
        return f"triton unavailable ({exc})"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def _gluon_device(q, k, v) -> str | None:
    """None when the tensors sit on an sm_90 GPU (exactly: the kernel is sm_90a code)."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not CUDA tensors"
    cap = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if cap != (9, 0):
        return f"needs sm_90 (this GPU is sm_{cap[0]}{cap[1]})"
    return None


def gluon_supports(q, k, v, bias, key_padding, alibi_slopes, seed, spec: AttentionSpec, *,
                   scale=None, config=None) -> str | None:
    """None when the Gluon forward (ops/gluon_fwd.py) runs this call, else the reason it runs the
    tl-level kernel instead (explain() shows it).  scale / config: the forward's, when known."""
    return _gluon_fwd_check(q, k, v, bias, key_padding, alibi_slopes, seed, spec, scale=scale, config=config)[0]


def _gluon_fwd_check(q, k, v, bias, key_padding, alibi_slopes, seed, spec, *, scale=None, config=None):
    """(reason or None, the TMA strides of q, k, v when None): each tensor's strides are worked
    out once per call, here, and handed to the launch (as the backward's _gluon_bwd_check)."""
    why = _gluon_fwd_reason(q, k, v, bias, key_padding, alibi_slopes, seed, spec, config)
    if why:
        return why, None
    from . import gluon_fwd
    strides = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        st = gluon_fwd.tma_strides(t)
        if st is None:
            return (f"{name} strides {tuple(t.stride())} / alignment not TMA-readable (needs the last dim "
                    "contiguous, other strides 16-byte multiples, a 16-byte aligned base)"), None
        strides.append(st)
    if scale is not None and not float(scale) > 0:
        return f"scale {float(scale)} <= 0", None
    return None, tuple(strides)


def _gluon_common_reason(q, k, v, bias, key_padding, alibi_slopes, seed, spec, config, which: str):
    """The rules the Gluon forward and backward share, in this order: the switch
    (config.gluon_forward / gluon_backward), tiles, autotune, the device, then the spec's features
    (only none or causal).  which: "forward" or "backward"."""
    from .. import autotune
    if not getattr(fa3_config, f"gluon_{which}"):
        return f"fa3_inductor.config.gluon_{which} is False"
    if config is not None or triton_configs._override.get("fwd" if which == "forward" else "bwd") is not None:
        return "an explicit tile config (the tl kernel's tiles)"
    if spec.autotune or autotune.enabled():
        return "autotune (max-autotune times the tl kernel's tiles)"
    why = _gluon_device(q, k, v)
    if why:
        return why
    if bias is not None or spec.mask_kind is not None:
        return f"a {spec.mask_kind or 'bias'} mask/bias tensor"
    if key_padding is not None or spec.key_padding:
        return "key padding"
    if alibi_slopes is not None or spec.alibi:
        return "ALiBi"
    if spec.softcap:
        return "softcap"
    if seed is not None or spec.dropout_p > 0:
        return "dropout"
    if spec.window_left is not None or spec.window_right not in (None, 0):
        return f"window (left={spec.window_left}, right={spec.window_right}): only causal or none"
    return None


def _gluon_heads_reason(q, k, v, spec) -> str | None:
    """The batch / head / length rules both Gluon kernels share (GQA "div" only)."""
    B, Hq, Sq = q.shape[:3]
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        return "q/k/v batch or k/v heads/lengths differ"
    Hk, Sk = k.shape[1], k.shape[2]
    if B * Hq * Sq == 0 or Sk == 0:
        return "empty tensors"
    if Hq % Hk:
        return "query heads not a multiple of kv heads"
    if Hq != Hk and spec.gqa_mapping != "div":
        return f"GQA mapping {spec.gqa_mapping!r} (needs 'div': kv head h // group)"
    return None


def _gluon_fwd_reason(q, k, v, bias, key_padding, alibi_slopes, seed, spec, config):
    """The shape / dtype / spec rules of the Gluon forward (strides aside): a reason or None."""
    from . import gluon_fwd
    why = _gluon_common_reason(q, k, v, bias, key_padding, alibi_slopes, seed, spec, config, "forward")
    if why:
        return why
    if q.dtype not in gluon_fwd.DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (needs fp16 or bf16, all the same)"
    D, Dk, Dv = q.shape[-1], k.shape[-1], v.shape[-1]
    if not (D == Dk == Dv and D in gluon_fwd.HEAD_DIMS):
        return f"head dims q/k {D}/{Dk}, v {Dv} (needs all 128 or all 256)"
    if spec.out_torch_dtype != q.dtype:
        return f"out dtype {spec.out_dtype} (needs the input's {q.dtype})"
    why = _gluon_heads_reason(q, k, v, spec)
    if why:
        return why
    if q.shape[0] * q.shape[1] > 65535:
        return f"B*Hq = {q.shape[0] * q.shape[1]} > 65535 (grid)"
    return None


# Deterministic dQ (the default) runs the Gluon kernel's ordered-turns mode only where the H100
# measured it faster than the tl kernels (session 11, device run 3: d64 / d128 with two 1-warp
# dQ writers on alternate tiles, d256 with its half-tile writer; 2-3 chains; fp16, b*s = 16k;
# ratio to cuDNN, turns / tl): from 4k keys at d64 (0.81-0.95 / 0.77-0.85), d128 non-causal
# (0.84-0.92 / 0.79-0.88) and d256 (0.66-0.86 / 0.58-0.62), from 1k at d128 causal (0.80-0.93
# / 0.74-0.76).  At 1k the tl kernels led elsewhere (d64 0.84-0.86 / 0.94-0.96, d128
# non-causal 0.81 / 0.86, d256 0.59-0.64 / 0.64-0.66).  In the turns mode key block n adds its
# dQ tile of a query block after the lower ranks of its chain (ops/gluon_bwd.deterministic_chains).
# Elsewhere: the tl kernels (deterministic_backward=False runs the Gluon kernel with atomic dQ).
# (head dim, causal) -> fewest keys for the turns
DETERMINISTIC_GLUON_MIN_SK = {(64, False): 4096, (64, True): 4096, (128, False): 4096, (128, True): 1024,
                              (256, False): 4096, (256, True): 4096}


def deterministic_tl_reason(D: int, Sk: int, causal: bool) -> str | None:
    """Why a deterministic backward of this shape runs the tl kernels, or None (Gluon turns)."""
    from . import gluon_bwd
    least = DETERMINISTIC_GLUON_MIN_SK.get((D, bool(causal)))
    if D not in gluon_bwd.DETERMINISTIC_HEAD_DIMS or least is None:
        return f"deterministic dQ at head dim {D}: the tl kernels"
    if Sk < least:
        return (f"deterministic dQ, {Sk} keys < {least} ({'causal' if causal else 'no mask'}, d{D}): "
                "the tl kernels (the Gluon turns measured slower)")
    return None


def deterministic_backward(spec: AttentionSpec) -> bool:
    """The site's compile setting (AttentionSpec.deterministic_backward), else the config's."""
    return (spec.deterministic_backward if spec.deterministic_backward is not None
            else fa3_config.deterministic_backward)


def gluon_bwd_supports(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, spec: AttentionSpec,
                       bias_requires_grad, *, scale=None, config=None) -> str | None:
    """None when the Gluon backward (ops/gluon_bwd.py) runs this call, else the reason it runs the
    tl-level kernels instead (explain() shows it).  config: the backward's tile config, if given."""
    return _gluon_bwd_check(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, spec,
                            bias_requires_grad, scale=scale, config=config)[0]


def _gluon_bwd_check(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, spec, bias_requires_grad,
                     *, scale=None, config=None):
    """(reason or None, the TMA strides of q, k, v, dout when None): each tensor's strides are
    worked out once per call, here, and handed to the launch."""
    from . import gluon_bwd
    why = _gluon_common_reason(q, k, v, bias, key_padding, alibi_slopes, seed, spec, config, "backward")
    if why:
        return why, None
    if bias_requires_grad:
        return "a bias gradient", None
    if q.dtype not in gluon_bwd.DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (needs fp16 or bf16, all the same)", None
    if dout.dtype != q.dtype or out.dtype != q.dtype:
        return f"out/dout dtype {out.dtype}/{dout.dtype} (needs the input's {q.dtype})", None
    if lse.dtype != torch.float32:
        return f"lse dtype {lse.dtype} (needs float32)", None
    D, Dk, Dv = q.shape[-1], k.shape[-1], v.shape[-1]
    if not (D == Dk == Dv and D in gluon_bwd.BWD_HEAD_DIMS):
        dims = " or ".join(str(d) for d in gluon_bwd.BWD_HEAD_DIMS)
        return f"head dims q/k {D}/{Dk}, v {Dv} (needs all {dims})", None
    why = _gluon_heads_reason(q, k, v, spec)
    if why:
        return why, None
    B, Hq, Sq = q.shape[:3]
    if tuple(dout.shape) != (B, Hq, Sq, Dv) or tuple(out.shape) != (B, Hq, Sq, Dv) or tuple(lse.shape) != (B, Hq, Sq):
        return f"out/dout/lse shapes {tuple(out.shape)}/{tuple(dout.shape)}/{tuple(lse.shape)}", None
    if B * Hq > 65535:
        return f"B*Hq = {B * Hq} > 65535 (grid of the preprocess / dQ kernels)", None
    if deterministic_backward(spec):
        why = deterministic_tl_reason(D, k.shape[2], spec.causal)
        if why:
            return why, None
    strides = []
    for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        st = gluon_bwd.tma_strides(t)
        if st is None:
            return (f"{name} strides {tuple(t.stride())} / alignment not TMA-readable (needs the last dim "
                    "contiguous, other strides 16-byte multiples, a 16-byte aligned base)"), None
        strides.append(st)
    if out.stride(-1) != 1:
        return "out's last dim is not contiguous", None
    return None, tuple(strides)


def _head_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tensor_args(q, bias, key_padding, alibi_slopes, seed, spec: AttentionSpec):
    """Kernel views of the optional tensors (None is a constexpr for Triton) and their strides."""
    B, H, Sq, _ = q.shape
    if spec.mask_kind is not None and bias is not None:
        bias = bias.expand(B, H, Sq, bias.shape[-1])  # a view: strides may be 0, never copied
        if bias.dtype == torch.bool:
            bias = bias.view(torch.uint8)
        bstrides = bias.stride()
    else:
        bias, bstrides = None, (0, 0, 0, 0)
    if spec.key_padding and key_padding is not None:
        kp = key_padding.view(torch.uint8) if key_padding.dtype == torch.bool else key_padding.to(torch.uint8)
        kpstrides = kp.stride()
    else:
        kp, kpstrides = None, (0, 0)
    slopes = alibi_slopes.to(torch.float32).contiguous() if spec.alibi else None
    seed_t = seed.to(torch.int64).contiguous() if spec.dropout_p > 0 else None
    return bias, bstrides, kp, kpstrides, slopes, seed_t


def _fwd_config(q, k, v, spec):
    from .. import autotune
    d, dv = q.shape[-1], v.shape[-1]
    if (spec.autotune or autotune.enabled()) and q.is_cuda:
        return autotune.best_fwd(q, k, v, spec)
    return triton_configs.for_spec(triton_configs.default_fwd(d, dv, spec.causal), spec)


def _bwd_config(q, k, v, spec):
    from .. import autotune
    d, dv = q.shape[-1], v.shape[-1]
    if (spec.autotune or autotune.enabled()) and q.is_cuda:
        return autotune.best_bwd(q, k, v, spec)
    return triton_configs.for_spec(triton_configs.default_bwd(d, dv, spec.causal), spec)


# Route decisions (the Gluon checks' (reason, TMA strides)) by call signature, for the calls
# with no optional tensors and no explicit tiles: a repeated call skips the checks (host time;
# ops/fast_launch.py says why it matters).  The key holds everything the checks read: the
# tensors' shapes, strides, dtypes, device and 16-byte alignment, the spec, the scale, and the
# switches read at run time (config.gluon_forward / gluon_backward / deterministic_backward,
# the tile override, autotune).
_ROUTES = SignatureCache()


def clear_plans() -> None:
    """Forget the remembered routes and launch plans (tests that patch the checks call it)."""
    from . import gluon_bwd, gluon_fwd
    _ROUTES.clear()
    _TL_PLANS.clear()
    gluon_fwd._PLANS.clear()
    gluon_bwd._PLANS.clear()


def _optional_keys(tensors) -> tuple:
    """tensor_key of each optional kernel operand of _tensor_args (bias, key padding, ALiBi
    slopes, dropout seed), None where absent."""
    return tuple(None if t is None else tensor_key(t) for t in (tensors[0], tensors[2], tensors[4], tensors[5]))


def forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec: AttentionSpec, *, config=None):
    q, k, v = _head_contig(q), _head_contig(k), _head_contig(v)
    if config is None and bias is None and key_padding is None and alibi_slopes is None and seed is None:
        from .. import autotune
        key = ("fwd", spec, float(scale), q.device, tensor_key(q), tensor_key(k), tensor_key(v),
               fa3_config.gluon_forward, triton_configs._override.get("fwd"), autotune.enabled())
        why, strides = _ROUTES.get_or_build(
            key, lambda: _gluon_fwd_check(q, k, v, None, None, None, None, spec, scale=scale))
    else:
        why, strides = _gluon_fwd_check(q, k, v, bias, key_padding, alibi_slopes, seed, spec, scale=scale,
                                        config=config)
    if why is None:
        from . import gluon_fwd
        return gluon_fwd.forward(q, k, v, float(scale), spec, strides=strides)
    B, H, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    out = torch.empty(B, H, Sq, Dv, dtype=spec.out_torch_dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse
    if Sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    tensors = _tensor_args(q, bias, key_padding, alibi_slopes, seed, spec)
    from .. import autotune
    # the tl forward's plan by call signature: the tensors' layouts (the optional ones' too),
    # the spec, scale, tile config and autotune state (what _fwd_config and the launch read)
    key = ("tlfwd", spec, float(scale), q.device, config, autotune.enabled(), triton_configs._override.get("fwd"),
           triton_configs.even_specialisation,
           tensor_key(q), tensor_key(k), tensor_key(v), out.dtype, *_optional_keys(tensors))
    plan = _TL_PLANS.get(key)
    if plan is None:     # built by the signature's first call, which it runs
        cfg = config or _fwd_config(q, k, v, spec)
        _TL_PLANS.put(key, _TlFwdPlan(q, k, v, out, lse, tensors, scale, spec, cfg))
    else:
        plan(q, k, v, out, lse, tensors)
    return out, lse


# _TlFwdPlans by call signature (forward()); cleared with the routes (clear_plans).
_TL_PLANS = SignatureCache()


class _TlFwdPlan:
    """The tl forward's launch for one call signature: the rendered module, the tile config that
    fit the device (_launch shrinks it on OutOfResources, once, on the first call), the grid,
    scalars and constexprs, and whether Q / K / V go through TMA descriptors.  Built by the
    signature's first call, which it also runs; later calls launch the kernel directly
    (fast_launch.Launch)."""

    def __init__(self, q, k, v, out, lse, tensors, scale, spec, cfg):
        from . import fast_launch
        B, H, Sq, D = q.shape
        HK, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        bias_t, bs, kp, kps, slopes, seed_t = tensors
        mod = triton_render.load("fwd", spec)
        d_pad, dv_pad = triton_configs.pad_head_dim(D), triton_configs.pad_head_dim(Dv)
        fold = fold_scale(spec, scale, d_pad)
        self.scalars = (float(scale), Sq, Sk, H, HK,
                        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                        bs[0], bs[1], bs[2], bs[3], kps[0], kps[1])
        tma_ok = _tma_ok(q, k, v)

        def launch(cfg):
            use_tma = bool(cfg.tma and tma_ok)
            kern = fast_launch.Launch(
                mod.attn_fwd, (triton_cdiv(Sq, cfg.block_m), B * H),
                HEAD_D=D, HEAD_DV=Dv, D_PAD=d_pad, DV_PAD=dv_pad,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=use_tma, LPT=cfg.lpt,
                EVEN_M=triton_configs.even(Sq, cfg.block_m), EVEN_N=triton_configs.even(Sk, cfg.block_n),
                FOLD_SCALE=fold, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            descs = _fwd_descriptors(q, k, v, cfg.block_m, cfg.block_n, d_pad, dv_pad) if use_tma else None
            self.kernel, self.descs, self.cfg = kern, descs, cfg
            self(q, k, v, out, lse, tensors)
        _launch(cfg, launch)

    def __call__(self, q, k, v, out, lse, tensors):
        bias_t, _, kp, _, slopes, seed_t = tensors
        kern = self.kernel
        src = (q, k, v) if self.descs is None else kern.descriptors((q, k, v), self.descs)
        kern(*src, out, lse, bias_t, kp, slopes, seed_t, *self.scalars)


def fold_scale(spec, scale, d_pad: int) -> bool:
    """FOLD_SCALE of the forward: plain scores, a positive scale, head dims up to 64.  Measured
    on the H100 against the unfolded kernel in one run (scripts/ab_triton_fold.py, session 6):
    d64 +1-6% in all eight cells (causal and not, 2k-16k), d128 -5% to +3% and d256 -2% to +1%,
    so the larger head dims keep the unfolded code."""
    return triton_render.plain_scores(spec) and float(scale) > 0 and d_pad <= 64


def _tma_ok(*tensors) -> bool:
    """Whether TMA can read every [B, H, S, D] tensor given (the rule of both the forward's and
    the backward's descriptors): 16-byte aligned base, nonzero 16-byte aligned strides (an
    expanded stride-0 view takes the pointer path)."""
    return all(t.data_ptr() % 16 == 0 and all(st > 0 and (st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def _desc_spec(t, rows: int, cols: int):
    """(shape, strides, box, layout None) of a TMA descriptor over the 4-D [B, H, S, D] view, one
    [rows, cols] tile per load (fast_launch.Launch.descriptors builds it; None: triton.tools'
    descriptor): zero fill past S (never the next head's rows) and past D (cols is the padded
    head dim), so the kernel's loads need no bounds."""
    return list(t.shape), list(t.stride()), [1, 1, rows, cols], None


def _fwd_descriptors(q, k, v, block_m: int, block_n: int, d_pad: int, dv_pad: int):
    """The tl forward's Q, K, V descriptor specs (_desc_spec) for tiles block_m x block_n."""
    return _desc_spec(q, block_m, d_pad), _desc_spec(k, block_n, d_pad), _desc_spec(v, block_n, dv_pad)


def _bwd_descriptors(q, k, v, dout, block_m: int, block_n: int, d_pad: int, dv_pad: int):
    """The backward's Q, K, V, dO descriptor specs (_desc_spec) for a kernel (half) with query
    tile block_m and key tile block_n; the caller has checked _tma_ok."""
    return (_desc_spec(q, block_m, d_pad), _desc_spec(k, block_n, d_pad), _desc_spec(v, block_n, dv_pad),
            _desc_spec(dout, block_m, dv_pad))


def backward(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, scale, spec: AttentionSpec,
             bias_requires_grad, *, config=None):
    q, k, v = _head_contig(q), _head_contig(k), _head_contig(v)
    dout, out = _head_contig(dout), _head_contig(out)
    if (config is None and bias is None and key_padding is None and alibi_slopes is None and seed is None
            and not bias_requires_grad):
        from .. import autotune
        key = ("bwd", spec, float(scale), q.device, tensor_key(q), tensor_key(k), tensor_key(v),
               tensor_key(dout), tensor_key(out), tensor_key(lse), fa3_config.gluon_backward,
               deterministic_backward(spec), triton_configs._override.get("bwd"), autotune.enabled())
        why, strides = _ROUTES.get_or_build(key, lambda: _gluon_bwd_check(dout, q, k, v, out, lse, None, None, None,
                                                                          None, spec, False, scale=scale))
    else:
        why, strides = _gluon_bwd_check(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, spec,
                                        bias_requires_grad, scale=scale, config=config)
    if why is None:
        from . import gluon_bwd
        dq, dk, dv = gluon_bwd.backward(dout, q, k, v, out, lse, float(scale), spec, deterministic_backward(spec),
                                        strides=strides)
        return dq, dk, dv, torch.empty(0, dtype=torch.float32, device=q.device)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    dev = q.device
    want_dbias = bool(bias_requires_grad and spec.mask_kind == "additive")
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    if want_dbias:
        # Window-skipped tiles are never visited: they must read as zero.
        alloc = torch.zeros if spec.has_window else torch.empty
        dbias = alloc(B, H, Sq, Sk, dtype=torch.float32, device=dev)
    else:
        dbias = torch.empty(0, dtype=torch.float32, device=dev)
    if Sq == 0 or Sk == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias.zero_() if want_dbias else dbias
    tensors = _tensor_args(q, bias, key_padding, alibi_slopes, seed, spec)
    from .. import autotune
    # the tl backward's plan by call signature (as the tl forward's, plus dO, O, LSE, the dQ mode
    # and dBias)
    key = ("tlbwd", spec, float(scale), dev, config, autotune.enabled(), triton_configs._override.get("bwd"),
           triton_configs.even_specialisation, deterministic_backward(spec), want_dbias,
           tensor_key(q), tensor_key(k), tensor_key(v), tensor_key(dout), tensor_key(out), tensor_key(lse),
           *_optional_keys(tensors))
    plan = _TL_PLANS.get(key)
    grads = (dq, dk, dv, dbias if want_dbias else None)
    if plan is None:     # built by the signature's first call, which it runs
        _TL_PLANS.put(key, _TlBwdPlan(dout, q, k, v, out, lse, tensors, grads, scale, spec, want_dbias,
                                      config or _bwd_config(q, k, v, spec)))
    else:
        plan(dout, q, k, v, out, lse, tensors, grads)
    return dq, dk, dv, dbias


class _TlBwdPlan:
    """The tl backward's launches for one call signature: the preprocess (delta = rowsum(dO * O)),
    then either the fused dK/dV + dQ kernel, or the dK/dV kernel (with atomic dQ into fp32 when
    deterministic_backward is off and no dBias is wanted) and the dQ kernel.  The tile configs
    that fit the device (_launch shrinks each kernel's on OutOfResources) and the GQA split are
    settled by the signature's first call, which the plan runs; later calls launch directly
    (fast_launch.Launch).  grads: (dq, dk, dv, dbias or None), written in place."""

    def __init__(self, dout, q, k, v, out, lse, tensors, grads, scale, spec, want_dbias, cfg):
        from . import fast_launch
        B, H, Sq, D = q.shape
        HK, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        bias_t, bs, kp, kps, slopes, seed_t = tensors
        self.mod = mod = triton_render.load("bwd", spec, dbias=want_dbias)
        self.d_pad, self.dv_pad = d_pad, dv_pad = triton_configs.pad_head_dim(D), triton_configs.pad_head_dim(Dv)
        self.dims = dict(HEAD_D=D, HEAD_DV=Dv, D_PAD=d_pad, DV_PAD=dv_pad)
        self.shapes = (B, H, HK, Sq, Sk, D, Dv)
        # deterministic_backward = False (the site's compile setting, else config's): dQ from atomics
        # inside the dK/dV kernel (no dQ kernel).  dBias needs the dQ kernel's per-tile dS, so it
        # keeps the deterministic path.
        self.atomic_dq = not deterministic_backward(spec) and not want_dbias
        pre_m = 64 if dv_pad <= 128 else 32
        self.pre = fast_launch.Launch(mod.attn_bwd_preprocess, (triton_cdiv(Sq, pre_m), B * H),
                                      HEAD_DV=Dv, DV_PAD=dv_pad, BLOCK_M=pre_m)
        self.pre_args = (Sq, H, out.stride(0), out.stride(1), out.stride(2),
                         dout.stride(0), dout.stride(1), dout.stride(2))
        # BwdConfig.tma: Q, K, V, dO through descriptors unless a stride forbids it (the forward's
        # rule); each kernel's descriptors take the tiles of the config it launched with.
        self.tma_allowed = _tma_ok(q, k, v, dout)
        self.common = (float(scale), Sq, Sk, H, HK,
                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
        self.tails = (bs[0], bs[1], bs[2], bs[3], kps[0], kps[1])
        self.kernels = []          # (name, Launch, descriptor specs or None, nsplit) in launch order
        self.fused = cfg.fused and not self.atomic_dq
        call = (dout, q, k, v, lse, tensors, grads, *self._begin(dout, out, q))
        if self.fused:
            _launch(cfg, lambda c: self._first("fused", c, call))
        else:
            _launch(cfg, lambda c: self._first("dkdv", c, call))
            if not self.atomic_dq:
                _launch(cfg, lambda c: self._first("dq", c, call))
        self._end(grads, call[-1])

    def _first(self, name, cfg, call):
        """Build and run one kernel's Launch with this config (the first call; _launch retries
        with a smaller config when it raises OutOfResources).  call: _run_one's arguments."""
        B, H, HK, Sq, Sk, D, Dv = self.shapes
        dout, q, k, v = call[:4]

        def descs_for(block_m, block_n):
            return _bwd_descriptors(q, k, v, dout, block_m, block_n, self.d_pad, self.dv_pad)
        tma = bool(cfg.tma and self.tma_allowed)
        even = triton_configs.even
        nsplit = 1
        if name == "dq":
            grid = (triton_cdiv(Sq, cfg.block_m2), B * H)
            consts = dict(BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, EVEN_M=even(Sq, cfg.block_m2),
                          EVEN_N=even(Sk, cfg.block_n2))
            descs = (descs_for(cfg.block_m2, cfg.block_n2),) if tma else None
        else:
            n_kv = triton_cdiv(Sk, cfg.block_n1)
            nsplit = gqa_splits(n_kv * B * HK, H // HK, q.device)
            if name == "fused":
                # Grid axis 0: the key blocks' dK/dV programs, then the dQ programs of this split's
                # query heads (attn_bwd_fused); same GQA split rule as the separate dK/dV kernel.
                n_dq = triton_cdiv(Sq, cfg.block_m2) * (H // HK // nsplit)
                grid = (n_kv + n_dq, B * HK * nsplit)
                consts = dict(BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2,
                              BLOCK_N2=cfg.block_n2, EVEN_M=even(Sq, cfg.block_m1, cfg.block_m2),
                              EVEN_N=even(Sk, cfg.block_n1, cfg.block_n2))
                # the dQ half reads Q, K, V, dO as well: its own descriptors (the dK/dV half's
                # when the tiles are equal), or pointer loads (descs None)
                same = (cfg.block_m2, cfg.block_n2) == (cfg.block_m1, cfg.block_n1)
                descs = None if not tma else (descs_for(cfg.block_m1, cfg.block_n1),) if same else (
                    descs_for(cfg.block_m1, cfg.block_n1), descs_for(cfg.block_m2, cfg.block_n2))
            else:
                grid = (n_kv, B * HK * nsplit)
                consts = dict(BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, ATOMIC_DQ=self.atomic_dq,
                              EVEN_M=even(Sq, cfg.block_m1), EVEN_N=even(Sk, cfg.block_n1))
                descs = (descs_for(cfg.block_m1, cfg.block_n1),) if tma else None
        fn = getattr(self.mod, "attn_bwd_" + name)      # attn_bwd_dq / _fused / _dkdv
        from . import fast_launch
        launch = fast_launch.Launch(fn, grid, **self.dims, **consts, USE_TMA=tma, num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages)
        entry = (name, launch, descs, nsplit)
        self._run_one(entry, *call)
        self.kernels.append(entry)

    def _begin(self, dout, out, q):
        """Per call: the fp32 scratch (delta, and the atomic dQ accumulator) and the preprocess."""
        B, H, HK, Sq, Sk, D, Dv = self.shapes
        dq_acc = torch.zeros(B, H, Sq, self.d_pad, dtype=torch.float32, device=q.device) if self.atomic_dq else None
        delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        self.pre(out, dout, delta, *self.pre_args)
        return delta, dq_acc

    def _end(self, grads, dq_acc):
        if self.atomic_dq:
            grads[0].copy_(dq_acc[..., :self.shapes[5]])

    def _run_one(self, entry, dout, q, k, v, lse, tensors, grads, delta, dq_acc):
        name, launch, descs, nsplit = entry
        bias_t, _, kp, _, slopes, seed_t = tensors
        dq, dk, dv, dbias = grads
        loads = (q, k, v, dout)
        src = [launch.descriptors(loads, ds) for ds in descs] if descs else [loads]
        if name == "dq":
            launch(*src[0], lse, delta, dq, dbias, bias_t, kp, slopes, seed_t, *self.common, *_strides3(dq),
                   *self.tails)
            return
        dk_t, dv_t = _split_targets(dk, dv, nsplit)
        B = self.shapes[0]
        if name == "fused":
            src2 = (None,) * 4 if descs is None else src[-1]
            launch(*src[0], *src2, lse, delta, dq, dk_t, dv_t, dbias, bias_t, kp, slopes, seed_t, *self.common,
                   *_strides3(dq), *_strides3(dk_t), *_strides3(dv_t), *self.tails, nsplit, B)
        else:
            launch(*src[0], lse, delta, dk_t, dv_t, bias_t, kp, slopes, seed_t, dq_acc, *self.common,
                   *_strides3(dk_t), *_strides3(dv_t), *self.tails, nsplit, B)
        _sum_splits(dk, dv, dk_t, dv_t, nsplit)

    def __call__(self, dout, q, k, v, out, lse, tensors, grads):
        delta, dq_acc = self._begin(dout, out, q)
        for entry in self.kernels:
            self._run_one(entry, dout, q, k, v, lse, tensors, grads, delta, dq_acc)
        self._end(grads, dq_acc)


def _strides3(t: torch.Tensor):
    """Batch, head and sequence strides of a [B, H, S, D] tensor (D is contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _split_targets(dk, dv, nsplit: int):
    """Where the dK/dV programs write: dk/dv themselves, or with nsplit > 1 fp32 partials
    [nsplit * B, HK, Sk, D] (one slice per split, summed by _sum_splits)."""
    if nsplit == 1:
        return dk, dv
    B = dk.shape[0]
    return (torch.empty(nsplit * B, *dk.shape[1:], dtype=torch.float32, device=dk.device),
            torch.empty(nsplit * B, *dv.shape[1:], dtype=torch.float32, device=dv.device))


def _sum_splits(dk, dv, dk_t, dv_t, nsplit: int):
    # Fixed summation order over the splits: deterministic.
    if nsplit > 1:
        dk.copy_(dk_t.view(nsplit, *dk.shape).sum(0))
        dv.copy_(dv_t.view(nsplit, *dv.shape).sum(0))


def gqa_splits(programs: int, group: int, device) -> int:
    """Programs per (key block, kv head) in the dK/dV kernel: the whole GQA group (1) unless the
    kv heads alone would leave the machine under two waves; then one per query head (measured on
    the H100: Llama 8/2 heads, B=2, S=2048 ran dK/dV on 64 programs at 485 us, docs/perf-notes.md)."""
    if group <= 1:
        return 1
    return group if programs < 2 * _sm_count(device) else 1


@functools.lru_cache(maxsize=None)
def sm_count_of(index: int) -> int:
    """SMs of CUDA device `index` (cached: launch decisions ask on every call)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 132   # the Triton interpreter (tests): an H100's count
    return sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _shrink(cfg):
    """Smaller variants of a config, tried in order when a launch runs out of shared memory or
    registers (e.g. a bias tile pipelined in 3 stages next to 128x128 K/V tiles)."""
    yield cfg
    if cfg.num_stages > 1:
        yield dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if isinstance(cfg, triton_configs.FwdConfig):
        if cfg.block_n > 32:
            yield dataclasses.replace(cfg, block_n=cfg.block_n // 2, num_stages=2)
        yield triton_configs.FwdConfig(64, 32, 4, 1)
    else:
        yield dataclasses.replace(cfg, block_m1=max(16, cfg.block_m1 // 2), block_n2=max(16, cfg.block_n2 // 2),
                                  num_stages=1)
        yield triton_configs.BwdConfig(16, 32, 32, 16, 4, 1)


def _launch(cfg, launch):
    """launch(cfg) with the first variant of cfg that fits the device."""
    from triton.runtime.errors import OutOfResources
    last = None
    for c in _shrink(cfg):
        try:
            return launch(c)
        except OutOfResources as exc:
            last = exc
    raise last


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
