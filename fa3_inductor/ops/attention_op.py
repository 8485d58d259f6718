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

Tensor = torch.Tensor


def _check_args(q, k, v, spec: AttentionSpec):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fa3 attention: q, k, v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


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
    _check_args(q, k, v, s)
    bias = _expand_bias(bias, q, k)
    impl = dispatch.choose_forward(q, k, v, bias, s)
    out, lse = impl.forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale, s)
    out = fully_masked.fix_forward(out, lse, v, s)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec):
    s = AttentionSpec.from_json(spec)
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
