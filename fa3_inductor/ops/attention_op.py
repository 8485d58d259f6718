"""The `fa3::attention_fwd` / `fa3::attention_bwd` custom ops, their fake
implementations and autograd.  The rewritten graph calls `attention()` below.

The ops are opaque to Inductor: it schedules around them, and AOTAutograd traces
their registered autograd into the joint graph (forward saves q, k, v, out, lse).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..spec import AttentionSpec
from . import dispatch, fully_masked
from .signature_cache import SignatureCache

Tensor = torch.Tensor


try:
    from torch.fx.experimental.symbolic_shapes import guard_or_false as _guard_or_false
except ImportError:  # older torch
    def _guard_or_false(x):
        return bool(x)


def _ne(a, b) -> bool:
    """a != b for ints or SymInts; an undecidable (unbacked) comparison counts as equal, so the
    fake implementation never raises a data-dependent error."""
    return _guard_or_false(a != b)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _validate(q, k, v, bias, key_padding, alibi_slopes, seed, spec: AttentionSpec) -> None:
    """Shape/dtype checks shared by the real and fake implementations of both ops: metadata only,
    no device synchronisation.  Raises ValueError naming the argument and what is allowed."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fa3 attention: q, k, v must be 4-D [B, H, S, D]; got q {_shape(q)}, "
                         f"k {_shape(k)}, v {_shape(v)}")
    B, Hq, Sq, D = q.shape
    _, Hk, Sk, Dk = k.shape
    if _ne(k.shape[0], B) or _ne(v.shape[0], B):
        raise ValueError(f"fa3 attention: q, k, v must have the same batch size (dim 0); got q {_shape(q)}, "
                         f"k {_shape(k)}, v {_shape(v)}")
    if _ne(v.shape[2], Sk):
        raise ValueError(f"fa3 attention: k and v must have the same sequence length (dim 2); got "
                         f"k {_shape(k)}, v {_shape(v)}")
    if _ne(v.shape[1], Hk):
        raise ValueError(f"fa3 attention: k and v must have the same number of heads (dim 1); got "
                         f"k {_shape(k)}, v {_shape(v)}")
    if _guard_or_false(Hk == 0) or _ne(Hq % Hk, 0):
        raise ValueError(f"fa3 attention: the number of query heads must be a multiple of the number of "
                         f"key/value heads; got q heads {Hq}, k/v heads {Hk}")
    if _ne(Dk, D):
        raise ValueError(f"fa3 attention: q and k must have the same head dim (dim 3); got q {_shape(q)}, "
                         f"k {_shape(k)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"fa3 attention: q, k, v must have the same dtype; got q {q.dtype}, k {k.dtype}, "
                         f"v {v.dtype}")
    # key padding
    if spec.key_padding:
        if key_padding is None:
            raise ValueError("fa3 attention: spec.key_padding=True needs a key_padding tensor of shape "
                             f"[B, Sk] = [{B}, {Sk}] (bool or integer); got None")
        if (key_padding.dim() != 2 or _ne(key_padding.shape[0], B) or _ne(key_padding.shape[1], Sk)
                or key_padding.dtype.is_floating_point or key_padding.dtype.is_complex):
            raise ValueError(f"fa3 attention: key_padding must be a bool or integer tensor of shape [B, Sk] = "
                             f"[{B}, {Sk}]; got {key_padding.dtype} {_shape(key_padding)}")
    # alibi
    if spec.alibi is not None:
        if alibi_slopes is None:
            raise ValueError(f"fa3 attention: spec.alibi={spec.alibi!r} needs alibi_slopes of shape [Hq] = "
                             f"[{Hq}]; got None")
        if alibi_slopes.dim() != 1 or _ne(alibi_slopes.shape[0], Hq):
            raise ValueError(f"fa3 attention: alibi_slopes must have shape [Hq] = [{Hq}]; got "
                             f"{_shape(alibi_slopes)}")
    # dropout seed
    if spec.dropout_p > 0:
        if seed is None:
            raise ValueError(f"fa3 attention: spec.dropout_p={spec.dropout_p} needs a seed tensor of 2 int64 "
                             "elements [seed, offset]; got None")
        if seed.dtype != torch.int64 or seed.dim() != 1 or _ne(seed.shape[0], 2):
            raise ValueError("fa3 attention: seed must be an int64 tensor of 2 elements [seed, offset]; got "
                             f"{seed.dtype} {_shape(seed)}")
    # bias / mask
    if spec.mask_kind is None:
        if bias is not None:
            raise ValueError(f"fa3 attention: a bias/mask tensor {_shape(bias)} was passed but spec.mask_kind "
                             "is None; set mask_kind to 'additive' or 'bool', or pass bias=None")
    else:
        full = (B, Hq, Sq, Sk)
        if bias is None:
            raise ValueError(f"fa3 attention: spec.mask_kind={spec.mask_kind!r} needs a bias tensor "
                             f"broadcastable to [B, Hq, Sq, Sk] = {list(full)}; got None")
        bad = bias.dim() > 4 or any(_ne(b, 1) and _ne(b, f)
                                    for b, f in zip(reversed(bias.shape), reversed(full)))
        if bad:
            raise ValueError(f"fa3 attention: bias of shape {_shape(bias)} does not broadcast to "
                             f"[B, Hq, Sq, Sk] = {list(full)}")


def _validate_bwd(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, spec: AttentionSpec) -> None:
    _validate(q, k, v, bias, key_padding, alibi_slopes, seed, spec)
    B, Hq, Sq, _ = q.shape
    want = (B, Hq, Sq, v.shape[3])
    for name, t in (("out", out), ("dout", dout)):
        if t.dim() != 4 or any(_ne(a, b) for a, b in zip(t.shape, want)):
            raise ValueError(f"fa3 attention_bwd: {name} must have shape [B, Hq, Sq, Dv] = {list(want)}; got "
                             f"{_shape(t)}")
    if lse.dim() != 3 or any(_ne(a, b) for a, b in zip(lse.shape, want[:3])):
        raise ValueError(f"fa3 attention_bwd: lse must have shape [B, Hq, Sq] = {list(want[:3])}; got "
                         f"{_shape(lse)}")


# Signatures (spec JSON, each tensor's shape and dtype) the real implementations have already
# validated: _validate reads nothing else, and repeated calls (every training step) skip it
# (host time per call, ops/fast_launch.py).  The fake implementations validate every time.
_VALIDATED = SignatureCache()


def _validate_once(spec_json: str, s: AttentionSpec, dout, q, k, v, out, lse, bias, key_padding, alibi_slopes,
                   seed) -> None:
    """_validate (dout is None: the forward's) or _validate_bwd, once per signature."""
    key = (spec_json,) + tuple(None if t is None else (t.shape, t.dtype)
                               for t in (dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed))
    if key in _VALIDATED:
        return
    if dout is None:
        _validate(q, k, v, bias, key_padding, alibi_slopes, seed, s)
    else:
        _validate_bwd(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, s)
    _VALIDATED.put(key, True)


def _expand_bias(bias, q, k):
    """The op takes a bias/mask in any shape broadcastable to [B, Hq, Sq, Sk]; the
    implementations see the expanded view (zero strides, no copy)."""
    if bias is None:
        return None
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@torch.library.custom_op("fa3::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], key_padding: Optional[Tensor],
                  alibi_slopes: Optional[Tensor], seed: Optional[Tensor], scale: float,
                  spec: str) -> tuple[Tensor, Tensor]:
    s = AttentionSpec.from_json(spec)
    _validate_once(spec, s, None, q, k, v, None, None, bias, key_padding, alibi_slopes, seed)
    bias = _expand_bias(bias, q, k)
    impl = dispatch.choose_forward(q, k, v, bias, s)
    out, lse = impl.forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale, s)
    out = fully_masked.fix_forward(out, lse, v, s)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec):
    s = AttentionSpec.from_json(spec)
    _validate(q, k, v, bias, key_padding, alibi_slopes, seed, s)
    B, H, Sq, _ = q.shape
    out = q.new_empty((B, H, Sq, v.shape[3]), dtype=s.out_torch_dtype)
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fa3::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  bias: Optional[Tensor], key_padding: Optional[Tensor], alibi_slopes: Optional[Tensor],
                  seed: Optional[Tensor], scale: float, spec: str,
                  bias_requires_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s = AttentionSpec.from_json(spec)
    _validate_once(spec, s, dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed)
    full_bias = _expand_bias(bias, q, k)
    impl = dispatch.choose(q, k, v, full_bias, s)
    dq, dk, dv, dbias = impl.backward(dout, q, k, v, out, lse, full_bias, key_padding, alibi_slopes, seed,
                                      scale, s, bias_requires_grad)
    dq, dk, dv = fully_masked.fix_backward(dout, q, k, v, lse, scale, s, dq, dk, dv)
    if dbias.numel() and bias is not None:
        # The bias came in its own (broadcastable) shape: sum the gradient back onto it.
        dbias = dbias.sum_to_size(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, scale, spec,
                        bias_requires_grad):
    s = AttentionSpec.from_json(spec)
    _validate_bwd(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, s)
    if bias_requires_grad and s.mask_kind == "additive" and bias is not None:
        dbias = bias.new_empty(bias.shape)
    else:
        dbias = q.new_empty((0,), dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec = inputs
    out, lse = output
    ctx.scale = scale
    ctx.spec = spec
    ctx.bias_requires_grad = bias is not None and bias.requires_grad
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.save_for_backward(q, k, v, out, lse, bias, key_padding, alibi_slopes, seed)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, key_padding, alibi_slopes, seed = ctx.saved_tensors
    dq, dk, dv, dbias = attention_bwd(dout.contiguous(), q, k, v, out, lse, bias, key_padding,
                                      alibi_slopes, seed, ctx.scale, ctx.spec, ctx.bias_requires_grad)
    if not ctx.bias_requires_grad:
        dbias = None
    return dq, dk, dv, dbias, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, bias=None, key_padding=None, alibi_slopes=None, seed=None, *, scale: float, spec: str):
    """Graph-facing entry: returns only the output (lse stays internal to autograd)."""
    out, _ = torch.ops.fa3.attention_fwd(q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec)
    return out
