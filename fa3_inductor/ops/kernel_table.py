"""kernel="auto": which forward kernel to try first, CUDA template or Triton template, per
(head dim, causal-like, key length) bucket, from a measurement on the H100.

Device run 11 of session 3 (fp16, b*s = 16k, hidden 2048, `python -m fa3_inductor.bench.cuda_rows
--impls cuda triton --no-ablation`), TFLOP/s CUDA / Triton:
  d64  full:   512 267/319, 1k 341/381, 2k 391/416, 4k+ equal (423/415, 420/422, 424/424)
  d64  causal: 512 148/195, 1k 226/273, 2k 287/340, 4k 338/387, 8k 393/355, 16k equal
  d128 full:   CUDA from 512 (337/305) up to 16k (614/478)
  d128 causal: 512 187/182, 1k 257/270, 2k 313/356, 4k+ CUDA (498/412 ... 617/408)
  d256 full:   512 334/326, CUDA from 1k (546/418) up
  d256 causal: 512 174/216, 1k 244/292, 2k+ CUDA (427/386 ... 711/438)
Device run 14 (after the CUDA template's causal tiles were grouped by L2, docs/perf-notes.md),
CUDA causal: d64 512 159, 1k 235, 2k 311, 4k 360, 8k 400; d128 512 210, 1k 332, 2k 420;
d256 512 223, 1k 365.  Against the Triton numbers above that moves d128 and d256 causal to CUDA
everywhere (15-25% ahead at 1k-2k) and leaves d64 causal with Triton up to 4k (7-23% ahead).
The two runs are different machine starts (cuDNN moved up to 5% between such runs); the
margins kept here are larger than that.
Session 5 (device run 3): the CUDA d64 tile became 192 x 128 (non-causal 347 / 461 / 485 at 1k / 4k /
16k, causal 197 / 353 / 451): still behind run 11's Triton 381 (non-causal 1k) and 387 (causal 4k) in the
buckets Triton owns, so the table stands.  Calls whose GQA heads the CUDA template packs (short
queries) go to it first whatever the bucket (dispatch._kernel_order).
Triton goes first where it measured faster by more than the noise; elsewhere the CUDA template
(which falls back to Triton for specs it does not support).  The backward is Triton's in both cases.
"""
from __future__ import annotations

# (largest head dim of the bucket, causal-like) -> longest key length at which Triton goes first
_TRITON_FIRST_UP_TO = {
    (64, False): 2048, (64, True): 4096,
    (128, False): 0, (128, True): 0,
    (256, False): 0, (256, True): 0,
}


def triton_first(head_dim: int, seqlen_k: int, causal_like: bool) -> bool:
    """True where the Triton forward measured faster than the CUDA template for this bucket."""
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return seqlen_k <= _TRITON_FIRST_UP_TO[(bucket, bool(causal_like))]
