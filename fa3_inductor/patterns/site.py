"""What the matcher found at one attention site, before it is written into the graph."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.fx as fx

from ..spec import AttentionSpec


@dataclasses.dataclass
class Site:
    anchor: fx.Node                      # the softmax (or SDPA) node the site was found from
    out_node: fx.Node                    # the node whose value the op replaces (P @ V, or the SDPA call)
    q: fx.Node
    k: fx.Node                           # [.., Sk, D] (not transposed)
    v: fx.Node
    rank: int                            # 4, or 3 for bmm-style [B*H, S, D]
    scale_factors: list                  # [(value or node, is_div)]
    spec_fields: dict
    bias: Optional[Any] = None           # node (or callable building one) for mask_kind
    key_padding: Optional[Any] = None    # [B, Sk] tensor node (keep where != 0)
    alibi_slopes: Optional[tuple] = None # (slopes node varying along heads only, sign): masks.alibi_of
    guards: list = dataclasses.field(default_factory=list)
    chain: list = dataclasses.field(default_factory=list)   # nodes that become dead after the rewrite
    out_permute: Optional[list] = None   # einsum outputs in another order than [B, H, Sq, Dv]
    k_transpose: bool = False            # k is the product's [.., D, Sk] operand: transpose it back
    perms: tuple = (None, None, None)    # einsum permutations of the q, k^T and v operands
    gqa_group: int = 1                   # query heads per kv head once K/V repeats are read through
    is_sdpa: bool = False                # an F.scaled_dot_product_attention call (sdpa_policy applies)
    mask_route: Optional[str] = None     # "structural", "speculated" or "tensor" (masks.py), None without masks
    speculated_mask: Optional[tuple] = None  # (mask input node, additive, neg_inf): mask_inputs.py
    heads: Optional[tuple] = None        # (B, H) graph values: a 3-D bmm site whose scores were masked in a
                                         # [B, H, Sq, Sk] view; q/k/v/out are unflattened to 4-D around the op
    spec: Optional[AttentionSpec] = None
    source: str = ""
    notes: list = dataclasses.field(default_factory=list)  # diagnostics only: why a mask stayed a tensor

    @property
    def has_head_axis(self) -> bool:
        """The op sees [B, H, Sq, Sk] scores: a 4-D site, or a 3-D bmm site masked in its [B, H] view."""
        return self.rank == 4 or self.heads is not None

    @property
    def scale_is_static(self) -> bool:
        return all(not isinstance(v, fx.Node) for v, _ in self.scale_factors)

    def static_scale(self) -> Optional[float]:
        if not self.scale_is_static:
            return None
        s = 1.0
        for v, is_div in self.scale_factors:
            s = s / float(v) if is_div else s * float(v)
        return s


@dataclasses.dataclass
class Unmatched:
    anchor: fx.Node
    reason: str
    source: str = ""
