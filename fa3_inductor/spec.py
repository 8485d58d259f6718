"""AttentionSpec: the one description of an attention site shared by every stage.

The matcher produces it, the reference, the Triton templates and the CUDA templates
consume it.  Every field has a meaning in `reference.py`; the kernels must agree.

Canonical math (per batch b, query head h, query row i, key column j):

    s      = scale * (q[b,h,i] . k[b,kvh(h),j])         (fp32 accumulation)
    s      = softcap * tanh(s / softcap)                 if softcap
    s      = s + alibi_slope[h] * (j - (i + off))        if alibi == "linear"
    s      = s - alibi_slope[h] * |j - (i + off)|        if alibi == "abs"
    s      = s + bias[b,h,i,j]                           if mask_kind == "additive"
             (a bias value <= BIAS_MASKED, i.e. a finfo.min or -inf mask entry, masks the score:
              keep is False there; adding it literally would overflow the kernels' log2 domain)
    keep   = window rule(i, j) and key_padding[b,j] and bool_mask[b,h,i,j]
    s      = where(keep, s, MASKED)                      MASKED: -inf or a finite minimum
    p      = softmax_j(s)       (dropout: p * keep_rng / (1 - dropout_p))
    out    = p @ v[b,kvh(h)]   in out_dtype

with off = 0 for align "top_left" and off = sk - sq for "bottom_right"; the window rule
keeps j iff  (window_right is None or j <= i + off + window_right) and
             (window_left  is None or j >= i + off - window_left).
Causal attention is window_right == 0.

`masked_value` says what eager does with masked scores, which only shows in rows where
every key is masked: "neg_inf" (-inf masks: such a row is NaN), "min_additive" (an
additive finfo.min mask: uniform weights over all keys, and gradients reach q and k
through the addition) or "min_fill" (masked_fill/where with finfo.min: uniform weights,
no gradient through the filled scores) or "zero" (SDPA's rule: such a row is 0).
`ops/fully_masked.py` applies them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

import torch

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

# Additive bias values at or below this are mask entries (finfo(fp32/bf16).min, -inf).
BIAS_MASKED = -1e30

ALIGNS = ("top_left", "bottom_right")
MASK_KINDS = (None, "additive", "bool")
ALIBI_KINDS = (None, "linear", "abs")
GQA_MAPPINGS = ("div", "mod")
MASKED_VALUES = ("neg_inf", "min_additive", "min_fill", "zero")
KERNELS = ("", "auto", "triton", "cuda", "reference")  # "": follow config.kernel at run time


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"AttentionSpec: unsupported dtype {dtype}; allowed: {sorted(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"AttentionSpec: unknown dtype name {name!r} (a dtype field such as out_dtype or "
                         f"softmax_dtype); allowed: {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    # Static structure of the scores.
    align: str = "top_left"
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    softcap: Optional[float] = None
    alibi: Optional[str] = None
    mask_kind: Optional[str] = None          # a mask/bias tensor the structure analysis could not absorb
    key_padding: bool = False                # a [B, Sk] keep-vector derived from a padding mask
    masked_value: str = "neg_inf"
    # Heads.
    gqa_mapping: str = "div"                 # kv head of query head h: h // group ("div") or h % Hk ("mod")
    # Probabilities.
    dropout_p: float = 0.0
    softmax_dtype: str = "float32"           # dtype eager ran the softmax in (ours is always fp32 inside)
    # Output.
    out_dtype: str = "float16"
    # FP8 (e4m3) forward with block scales and Hadamard incoherent processing; the backward,
    # if any, is the fp16/bf16 one.  Set at compile time from config.fp8 / fp8_training.
    fp8: bool = False
    # What the scale was, for reports: a number, or the symbolic expression it came from.
    scale_repr: str = ""
    # How to run it, fixed when the graph was compiled (not semantics: semantic_json() leaves them
    # out).  kernel: config.kernel of that compile, e.g. options={"fa3.kernel": "triton"}; "" (a
    # spec made outside a compile) follows config.kernel when the op runs.  autotune: compiled with
    # mode="max-autotune": the first call of each shape bucket times the Triton tile candidates
    # and, under kernel "auto", the CUDA template against the Triton one (autotune.py).
    # deterministic_backward: config.deterministic_backward of that compile; None follows the
    # config when the backward runs.
    kernel: str = ""
    autotune: bool = False
    deterministic_backward: Optional[bool] = None

    def __post_init__(self):
        if self.align not in ALIGNS:
            raise ValueError(f"AttentionSpec.align={self.align!r}; allowed: {ALIGNS}")
        for name in ("window_left", "window_right"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"AttentionSpec.{name}={val!r}; allowed: None or an int >= 0")
        if self.softcap is not None and not (isinstance(self.softcap, (int, float)) and self.softcap > 0):
            raise ValueError(f"AttentionSpec.softcap={self.softcap!r}; allowed: None or a float > 0")
        if self.alibi not in ALIBI_KINDS:
            raise ValueError(f"AttentionSpec.alibi={self.alibi!r}; allowed: {ALIBI_KINDS}")
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"AttentionSpec.mask_kind={self.mask_kind!r}; allowed: {MASK_KINDS}")
        if self.masked_value not in MASKED_VALUES:
            raise ValueError(f"AttentionSpec.masked_value={self.masked_value!r}; allowed: {MASKED_VALUES}")
        if self.gqa_mapping not in GQA_MAPPINGS:
            raise ValueError(f"AttentionSpec.gqa_mapping={self.gqa_mapping!r}; allowed: {GQA_MAPPINGS}")
        if not (isinstance(self.dropout_p, (int, float)) and 0.0 <= self.dropout_p < 1.0):
            raise ValueError(f"AttentionSpec.dropout_p={self.dropout_p!r}; allowed: a float in [0, 1)")
        if self.kernel not in KERNELS:
            raise ValueError(f"AttentionSpec.kernel={self.kernel!r}; allowed: {KERNELS}")
        if self.deterministic_backward not in (None, True, False):
            raise ValueError(f"AttentionSpec.deterministic_backward={self.deterministic_backward!r}; "
                             "allowed: None, True, False")
        for name in ("softmax_dtype", "out_dtype"):
            val = getattr(self, name)
            if not isinstance(val, str) or val not in _DTYPES:
                raise ValueError(f"AttentionSpec.{name}={val!r}; allowed: {sorted(_DTYPES)}")

    # ---- derived views -------------------------------------------------------------
    @property
    def causal(self) -> bool:
        return self.window_right == 0

    @property
    def causal_kind(self) -> str:
        return self.align if self.causal else "none"

    @property
    def has_window(self) -> bool:
        return self.window_left is not None or self.window_right is not None

    @property
    def out_torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.out_dtype)

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)

    # ---- serialisation: the custom op carries the spec as a string argument ---------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def semantic_json(self) -> str:
        """to_json() without the run settings (kernel, autotune, deterministic_backward): the key
        of what the attention computes, for generated-kernel caches, tuned tiles and the FP8
        rotation's seed (cached per spec: the FP8 forward derives its seed on every call)."""
        return _semantic_json(self)

    @classmethod
    def from_json(cls, text: str) -> "AttentionSpec":
        return _from_json_cached(text)

    def describe(self) -> str:
        """One short line for explain() tables and log messages."""
        parts = []
        parts.append(f"causal={self.causal_kind}")
        if self.window_left is not None:
            parts.append(f"window_left={self.window_left}")
        if self.window_right not in (None, 0):
            parts.append(f"window_right={self.window_right}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.alibi:
            parts.append(f"alibi={self.alibi}")
        if self.key_padding:
            parts.append("key_padding")
        if self.mask_kind:
            parts.append(f"mask={self.mask_kind}")
        if self.dropout_p:
            parts.append(f"dropout={self.dropout_p:g}")
        if self.fp8:
            parts.append("fp8")
        if self.kernel not in ("", "auto"):
            parts.append(f"kernel={self.kernel}")
        if self.autotune:
            parts.append("autotune")
        if self.deterministic_backward is False:
            parts.append("dq=atomic")
        if self.scale_repr:
            parts.append(f"scale={self.scale_repr}")
        parts.append(f"masked={self.masked_value}")
        parts.append(f"out={self.out_dtype}")
        return " ".join(parts)


@functools.lru_cache(maxsize=4096)
def _semantic_json(spec: AttentionSpec) -> str:
    return spec.replace(kernel="", autotune=False, deterministic_backward=None).to_json()


_SPEC_CACHE: dict = {}


def _from_json_cached(text: str) -> AttentionSpec:
    spec = _SPEC_CACHE.get(text)
    if spec is None:
        spec = AttentionSpec(**json.loads(text))
        _SPEC_CACHE[text] = spec
    return spec
