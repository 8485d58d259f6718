"""When an existing F.scaled_dot_product_attention call is rewritten to our op.

backend="fa3" must never be slower than backend="inductor": an SDPA site is rewritten only
where the table below, measured on the H100 by `python -m fa3_inductor.bench --kernels`,
says our kernel beats what SDPA runs for that spec and shape.  A dense 4-D mask that our
analysis reduced to structure (causal, window, key padding) is where SDPA loses most: it
then runs cuDNN/efficient attention with a b*h*s*s mask read and no block skipping.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import config
from .patterns import nodes as N

# (head_dim, causal, structured_mask) -> minimum seqlen_k from which ours measured faster.
# Filled from measurements (docs/perf.md); a key that is absent means "not measured faster".
MEASURED_FASTER: dict = {
    # H100, 2026-11-25 model grid (docs/perf.md): Llama sdpa padded 4k 1.15x, Mistral 1.30x.
    (128, True, True): 4096,
}


def why_not(site, spec) -> Optional[str]:
    if config.sdpa_rewrite == "always":
        return None
    if config.sdpa_rewrite == "never":
        return "config.sdpa_rewrite='never'"
    qs, ks = N.shape(site.q), N.shape(site.k)
    try:
        d, sk = int(qs[-1]), int(ks[-2])
    except (TypeError, ValueError):
        return "SDPA site with symbolic sizes: no measurement covers it"
    structured = spec.key_padding or (spec.has_window and site.mask_route == "structural")
    key = (d, spec.causal, bool(structured))
    min_sk = MEASURED_FASTER.get(key)
    if min_sk is None or sk < min_sk:
        return (f"SDPA kept: our kernel is not measured faster for head_dim={d} causal={spec.causal} "
                f"structured_mask={bool(structured)} seqlen_k={sk} (sdpa_policy.MEASURED_FASTER)")
    if N.dtype(site.q) not in (torch.float16, torch.bfloat16):
        return "SDPA kept: fp32 inputs"
    return None
