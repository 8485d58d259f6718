"""Render the Triton attention templates (kernels/triton/*.py.tmpl) for one AttentionSpec.

The spec decides the *code*: score modification (scale, softcap, alibi, additive bias) and the
mask rule (window edges, key padding, bool mask) are generated into `_score_mod` / `_mask_mod`,
and feature switches become module-level `tl.constexpr` globals, so a spec without e.g. dropout
carries no dropout code at all.  Tile sizes, num_warps and num_stages are *launch* parameters
(constexpr kernel arguments): one rendered module serves every config, and Triton's own cache
keys the compiled binaries per config.

Rendered modules are written to an on-disk cache (``$FA3_INDUCTOR_CACHE/triton`` or
``~/.cache/fa3_inductor/triton``), keyed by a hash of (template sources, spec json, render
options, triton version), and imported with importlib: Triton's JIT needs a real source file
(it reads the function source through inspect/linecache).  An in-process memo avoids re-reading.

"gluon_fwd" (kernels/triton/gluon_fwd.py.tmpl, the Gluon forward of ops/gluon_fwd.py) and "gluon_bwd"
(kernels/triton/gluon_bwd.py.tmpl, the Gluon backward of ops/gluon_bwd.py) are used as written: no
spec, keyed by their source and the triton version.
"""
from __future__ import annotations

import hashlib
import math
import pathlib
import threading

import struct

from ..kernels_path import read_template
from ..spec import AttentionSpec

_TEMPLATES = {"fwd": "triton/attn_fwd.py.tmpl", "bwd": "triton/attn_bwd.py.tmpl",
              "gluon_fwd": "triton/gluon_fwd.py.tmpl", "gluon_bwd": "triton/gluon_bwd.py.tmpl"}
_COMMON = "triton/attn_common.py.tmpl"
# Kinds used as written (no per-spec rendering): their key is the source and the triton version.
_PLAIN = ("gluon_fwd", "gluon_bwd")
_memo: dict = {}
_lock = threading.Lock()


def cache_dir() -> pathlib.Path:
    return cache_root("triton")


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # rendering itself does not need triton (tests of the text)
        return "none"


# ---- generated code pieces -------------------------------------------------------------

def plain_scores(spec: AttentionSpec) -> bool:
    """Scores are the scaled q.k alone (no softcap, ALiBi or additive bias; masks only set -inf):
    the forward may then take the row max of the raw q.k and fold the scale into the exponent's
    FMA (FOLD_SCALE), which is exact when the scale is positive."""
    return not spec.softcap and spec.alibi is None and spec.mask_kind != "additive"


def _constants(spec: AttentionSpec, dbias: bool) -> str:
    def c(name, val):
        return f"{name} = tl.constexpr({val!r})"
    lines = [
        c("GQA_DIV", spec.gqa_mapping == "div"),
        c("ALIGN_BOTTOM_RIGHT", spec.align == "bottom_right"),
        c("HAS_WL", spec.window_left is not None),
        c("WL", spec.window_left if spec.window_left is not None else 0),
        c("HAS_WR", spec.window_right is not None),
        c("WR", spec.window_right if spec.window_right is not None else 0),
        c("HAS_ALIBI", spec.alibi is not None),
        c("HAS_SOFTCAP", bool(spec.softcap)),
        c("HAS_DROPOUT", spec.dropout_p > 0),
        c("HAS_KEY_PADDING", bool(spec.key_padding)),
        c("HAS_BIAS_TENSOR", spec.mask_kind is not None),
        c("WRITE_DBIAS", bool(dbias and spec.mask_kind == "additive")),
    ]
    return "\n".join(lines)


from ..spec import BIAS_MASKED  # noqa: E402
from .source_cache import cache_root, import_source  # noqa: E402


def _score_mod(spec: AttentionSpec) -> str:
    ind = "    "
    out = []
    if spec.softcap:
        cap = float(spec.softcap)
        out.append(f"s = _tanh(qk * (sm_scale * {1.0 / cap!r})) * {cap * math.log2(math.e)!r}")
    else:
        out.append("s = qk * (sm_scale * LOG2E)")
    if spec.alibi == "linear":
        out.append("s = s + slope2 * (j - (i + OFF)).to(tl.float32)")
    elif spec.alibi == "abs":
        out.append("s = s - slope2 * tl.abs(j - (i + OFF)).to(tl.float32)")
    if spec.mask_kind == "additive":
        # Bias tile loaded through its own strides (often 0 from expand()): never materialised.
        # Values <= BIAS_MASKED (finfo.min / -inf mask entries) mask the score: adding them
        # literally would overflow the log2 domain (-3.4e38 * log2e = -inf, then NaN).
        out.append("b = _load_ij(Bias_bh + i * sbm + j * sbn, i, j, Sq, Sk, EVEN_M, EVEN_N).to(tl.float32)")
        out.append(f"s = tl.where(b <= {BIAS_MASKED!r}, float(\"-inf\"), s + b * LOG2E)")
    return "\n".join(ind + line for line in out)


def _softcap_grad(spec: AttentionSpec) -> str:
    if spec.softcap:
        cap = float(spec.softcap)
        return f"    t = _tanh(qk * (sm_scale * {1.0 / cap!r}))\n    return 1.0 - t * t"
    return "    return qk * 0.0 + 1.0"


def _mask_mod(spec: AttentionSpec) -> str:
    # The key-boundary test (j < Sk) and the operands' bound checks exist only for the seqlen
    # edge: under EVEN_N / EVEN_M (launch constexprs) they are compiled out.  The spec's own
    # rules (window, key padding, bool mask) are untouched.
    window = []
    if spec.window_right is not None:
        window.append(f"(j <= i + OFF + {spec.window_right})")
    if spec.window_left is not None:
        window.append(f"(j >= i + OFF - {spec.window_left})")
    lines = ["if MASK:"]
    if window:
        lines += ["    keep = " + " & ".join(window),
                  "    if not EVEN_N:",
                  "        keep = keep & (j < Sk)",
                  '    s = tl.where(keep, s, float("-inf"))']
    else:
        lines += ["    if not EVEN_N:",
                  '        s = tl.where(j < Sk, s, float("-inf"))']
    if spec.key_padding:
        lines.append("kp = _load_rows(KP_b + j * skpn, j < Sk, 0, EVEN_N)")
        lines.append('s = tl.where(kp != 0, s, float("-inf"))')
    if spec.mask_kind == "bool":
        lines.append("bm = _load_ij(Bias_bh + i * sbm + j * sbn, i, j, Sq, Sk, EVEN_M, EVEN_N)")
        lines.append('s = tl.where(bm != 0, s, float("-inf"))')
    return "\n".join("    " + line for line in lines)


def dropout_threshold(p: float) -> int:
    """keep iff (h >> 8) * 2^-24 >= float32(p)  <=>  (h >> 8) >= ceil(float32(p) * 2^24) (exact)."""
    p32 = struct.unpack("f", struct.pack("f", p))[0]  # p rounded to float32, as the kernel compares
    return int(math.ceil(p32 * (1 << 24)))


def _dropout_keep(spec: AttentionSpec) -> str:
    p = float(spec.dropout_p)
    thresh = dropout_threshold(p) if p > 0 else 0
    return f"    return tl.where((h >> 8) >= {thresh}, {1.0 / (1.0 - p)!r}, 0.0)"


def render_source(kind: str, spec: AttentionSpec | None, *, dbias: bool = False) -> str:
    if kind in _PLAIN:
        text = read_template(_TEMPLATES[kind])
        if "{{" in text:
            raise RuntimeError(f"fa3 triton_render: placeholder in the plain {kind} template")
        return text
    common = read_template(_COMMON)
    for key, val in (("{{SCORE_MOD}}", _score_mod(spec)), ("{{SOFTCAP_GRAD}}", _softcap_grad(spec)),
                     ("{{MASK_MOD}}", _mask_mod(spec)), ("{{DROPOUT_KEEP}}", _dropout_keep(spec))):
        common = common.replace(key, val)
    text = read_template(_TEMPLATES[kind])
    text = text.replace("{{SPEC_JSON}}", spec.semantic_json())
    text = text.replace("{{CONSTANTS}}", _constants(spec, dbias))
    text = text.replace("{{COMMON}}", common)
    if "{{" in text:
        raise RuntimeError(f"fa3 triton_render: unfilled placeholder in {kind} template")
    return text


def _key(kind: str, spec: AttentionSpec | None, dbias: bool) -> str:
    h = hashlib.sha256()
    if kind in _PLAIN:
        parts = (kind, read_template(_TEMPLATES[kind]), _triton_version())
    else:
        parts = (read_template(_TEMPLATES[kind]), read_template(_COMMON), spec.semantic_json(),
                 f"dbias={bool(dbias and spec.mask_kind == 'additive')}", _triton_version())
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def load(kind: str, spec: AttentionSpec | None = None, *, dbias: bool = False):
    """The rendered module for (kind, spec): has attn_fwd, or attn_bwd_{preprocess,dkdv,dq};
    "gluon_fwd" (no spec) has the Gluon forward's attn_fwd_kernel (ops/gluon_fwd.py), "gluon_bwd" the
    Gluon backward's attn_bwd_kernel, attn_bwd_preprocess and attn_bwd_dq_finish (ops/gluon_bwd.py)."""
    if kind in _PLAIN:
        spec, dbias = None, False
    memo_key = (kind, spec, bool(dbias and spec is not None and spec.mask_kind == "additive"))
    mod = _memo.get(memo_key)
    if mod is not None:
        return mod
    with _lock:
        mod = _memo.get(memo_key)
        if mod is not None:
            return mod
        key = _key(kind, spec, dbias)
        path = cache_dir() / f"attn_{kind}_{key}.py"
        mod = import_source(path, render_source(kind, spec, dbias=dbias), f"fa3_triton_attn_{kind}_{key}")
        _memo[memo_key] = mod
        return mod
