"""fa3_inductor.explain(fn_or_module, *args, **kwargs): which attention sites the backend
finds, with their AttentionSpec, and why every other softmax was left alone.

It traces with Dynamo exactly as torch.compile(backend="fa3") would, runs the matcher on
every graph, and runs the function eagerly (nothing is rewritten).  For each site rewritten on
this machine it names the forward kernel run-time dispatch picks for the example shapes; on a
GPU that asks the CUDA template whether it builds, so a first explain() may JIT-compile it.
"""
from __future__ import annotations

import dataclasses

import torch



@dataclasses.dataclass
class MatchedSite:
    source: str
    spec: object
    rewritten_on_this_machine: bool
    note: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    gqa_group: int
    kernel: str = ""          # forward implementation dispatch picks for the example shapes
    # where kernel is "triton": "gluon" (the Gluon forward runs it) or "tl: <why not Gluon>"
    triton_forward: str = ""
    # where kernel is "triton" or "cuda" (both backwards are triton_impl.backward): "gluon" (the
    # Gluon backward runs it, if the site trains) or "tl: <why not Gluon>"
    triton_backward: str = ""


@dataclasses.dataclass
class UnmatchedSoftmax:
    source: str
    reason: str


@dataclasses.dataclass
class ExplainReport:
    matched: list
    unmatched: list
    graphs: int

    def __str__(self) -> str:
        lines = [f"fa3_inductor.explain: {len(self.matched)} attention site(s) matched, "
                 f"{len(self.unmatched)} softmax left alone, {self.graphs} graph(s)"]
        if self.matched:
            lines.append("")
            lines.append(f"{'#':>3}  {'file:line':<32} {'q / k / v':<40} spec")
            for i, m in enumerate(self.matched):
                where, code = _split_source(m.source)
                shapes = f"{_fmt(m.q_shape)} {_fmt(m.k_shape)} {_fmt(m.v_shape)}"
                kern = f"{m.kernel}, forward {m.triton_forward}" if m.triton_forward else m.kernel
                bwd = f" [backward {m.triton_backward}]" if m.triton_backward else ""
                extra = (f"  [kernel: {kern}]{bwd}" if m.kernel else "") if m.rewritten_on_this_machine \
                    else f"  [not rewritten here: {m.note}]"
                gqa = f" gqa={m.gqa_group}:1" if m.gqa_group > 1 else ""
                lines.append(f"{i:>3}  {where:<32} {shapes:<40} {m.spec.describe()}{gqa}{extra}")
                if code:
                    lines.append(f"       {code}")
        if self.unmatched:
            lines.append("")
            lines.append("left alone:")
            for u in self.unmatched:
                where, code = _split_source(u.source)
                lines.append(f"  {where}: {u.reason}")
                if code:
                    lines.append(f"       {code}")
        return "\n".join(lines)

    __repr__ = __str__


def _split_source(source: str) -> tuple:
    """Split a site's source 'file.py:12 code' into ('file.py:12', 'code'); anything else
    comes back whole as (source, '')."""
    source = (source or "").strip()
    head, _, code = source.partition(" ")
    if ":" in head and head.rsplit(":", 1)[1].isdigit():
        path, line = head.rsplit(":", 1)
        return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}", code.strip()
    return source, ""


def _fmt(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]" if shape else "?"


def planned_kernel(site) -> tuple:
    """(kernel, triton_forward, triton_backward).  kernel: the forward implementation (cuda /
    triton / fp8 (cuda|triton) / reference) that run-time dispatch picks for tensors shaped like
    the site's example q, k, v (and bias): dtype, head dim, sequence lengths, strides and the
    measured kernel table decide it; "decided per call" where the example has symbolic sizes or
    the layout differs from the op's 4-D view.  triton_forward, where kernel is "triton":
    "gluon" when the Gluon forward serves the call, else "tl: <reason>"
    (triton_impl.gluon_supports).  triton_backward, where kernel is "triton" or "cuda" (both run
    triton_impl.backward): "gluon" or "tl: <reason>" (triton_impl.gluon_bwd_supports, for a
    contiguous dout / out as autograd passes them)."""
    from .ops import dispatch
    from .patterns import nodes as N

    def like(node):
        val = N.val(node) if node is not None else None
        if not isinstance(val, torch.Tensor):
            raise ValueError("no example value")
        t = torch.empty_strided(tuple(int(x) for x in val.shape), tuple(int(x) for x in val.stride()),
                                dtype=val.dtype, device=val.device)
        return t if t.dim() == 4 else t.unsqueeze(0)
    try:
        q, k, v = like(site.q), like(site.k), like(site.v)
        if site.k_transpose:
            k = k.transpose(-1, -2)
        if q.shape[1] % k.shape[1] or k.shape[-1] != q.shape[-1]:
            raise ValueError("layout differs from the op's view")
        bias = None
        if site.spec.mask_kind is not None:
            bias = torch.zeros(1, 1, 1, 1, dtype=torch.bool if site.spec.mask_kind == "bool" else q.dtype,
                               device=q.device)
        impl = dispatch.choose_forward(q, k, v, bias, site.spec)
        name = dispatch.name_of(impl)
        if name == "fp8":  # which FP8 kernel: the CUDA template or the Triton one
            name = f"fp8 ({impl.kernel_for(q, k, v, bias, site.spec)})"
    except Exception:  # symbolic sizes, unusual layouts: the choice is made when the op runs
        return "decided per call", "", ""
    fwd = bwd = ""
    if name == "triton":
        try:
            from .ops import triton_impl
            why = triton_impl.gluon_supports(q, k, v, bias, None, None, None, site.spec,
                                             scale=site.static_scale())
            fwd = "gluon" if why is None else f"tl: {why}"
        except Exception:  # noqa: BLE001 - a report, not a decision
            fwd = ""
    if name in ("triton", "cuda"):
        try:
            from .ops import triton_impl
            B, Hq, Sq = q.shape[:3]
            out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=site.spec.out_torch_dtype, device=q.device)
            lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
            why = triton_impl.gluon_bwd_supports(out, q, k, v, out, lse, bias, None, None, None, site.spec,
                                                 False, scale=site.static_scale())
            bwd = "gluon" if why is None else f"tl: {why}"
        except Exception:  # noqa: BLE001 - a report, not a decision
            bwd = ""
    return name, fwd, bwd


def explain(fn_or_module, *args, **kwargs) -> ExplainReport:
    from .backend import analyse_and_rewrite
    from .patterns import nodes as N

    matched, unmatched = [], []
    graphs = [0]

    def collect(gm, example_inputs, **_):
        graphs[0] += 1
        report = analyse_and_rewrite(gm, example_inputs, rewrite=False)
        for site, _done, why_not in report.matched:
            qs, ks, vs = N.shape(site.q) or (), N.shape(site.k) or (), N.shape(site.v) or ()
            group = site.gqa_group
            would = why_not == ""
            matched.append(MatchedSite(site.source or site.anchor.name, site.spec, would, why_not,
                                       tuple(qs), tuple(ks), tuple(vs), group,
                                       *(planned_kernel(site) if would else ("", "", ""))))
        for um in report.unmatched:
            unmatched.append(UnmatchedSoftmax(um.source or um.anchor.name, um.reason))
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn_or_module, backend=collect)
        compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return ExplainReport(matched, unmatched, graphs[0])
