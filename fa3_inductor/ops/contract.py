"""The contract every attention implementation (reference, Triton, CUDA) keeps.

forward(q, k, v, bias, key_padding, alibi_slopes, seed, scale, spec) -> (out, lse)
  q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]: any strides (views of the
  user's tensors; last dim need not be contiguous for the reference, kernels may ask
  `needs_contiguous_last_dim`).  Hq % Hk == 0; the kv head of query head h follows
  spec.gqa_mapping.
  bias: None, or [B, Hq, Sq, Sk] (an expand() view with zero strides on broadcast dims: the
        op takes any broadcastable shape and expands it before calling you) holding an
        additive bias (spec.mask_kind == "additive") or a keep-mask (== "bool").
  key_padding: None, or [B, Sk] bool, True = keep (spec.key_padding).
  alibi_slopes: None, or [Hq] fp32 (spec.alibi).
  seed: None, or an int64 tensor of 2 elements (seed, offset) for dropout (spec.dropout_p > 0).
  out: [B, Hq, Sq, Dv] contiguous, dtype spec.out_dtype.
  lse: [B, Hq, Sq] contiguous fp32, natural log; rows with no unmasked key: out = 0, lse = -inf.

backward(dout, q, k, v, out, lse, bias, key_padding, alibi_slopes, seed, scale, spec,
         bias_requires_grad) -> (dq, dk, dv, dbias)
  dq/dk/dv in the dtype and shape of q/k/v (dk, dv reduced over each kv head's group);
  dbias: [B, Hq, Sq, Sk] fp32 gradient of the expanded bias, or an empty tensor (the op sums
         it back onto the bias' own shape).
  Rows with lse = -inf contribute nothing.

Eager's treatment of fully masked rows (NaN, or uniform weights for finfo.min masks) is
applied on top of this contract by `fully_masked.py`, identically for every implementation.
"""
