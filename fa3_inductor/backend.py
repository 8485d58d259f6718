"""The "fa3" torch.compile backend: rewrite attention in the Dynamo graph, then hand the
whole graph to Inductor (mode and options passed through).

Rewriting the Dynamo graph, before AOTAutograd, serves inference and training with one
pattern: the custom op's registered autograd supplies the backward, and Inductor's own
joint-graph attention pass never sees our sites.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import pathlib
from typing import Any, Optional

import torch
import torch.fx as fx

from . import config, config_check
from .ops.dispatch import hopper_available
from .patterns import nodes as N
from .patterns.matcher import find_sites
from .patterns.rewrite import build_spec, remove_dead, rewrite_site
from .patterns.site import Unmatched

log = logging.getLogger("fa3_inductor")


@dataclasses.dataclass
class GraphReport:
    matched: list      # [(Site, rewritten: bool, why_not: str)]
    unmatched: list    # [Unmatched]


# Reports of the graphs compiled in this process, newest last (explain() reads them).
REPORTS: list = []


def _example_of(gm: fx.GraphModule, example_inputs) -> dict:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {}
    for node, ex in zip(placeholders, example_inputs):
        if isinstance(ex, torch.Tensor):
            out[node] = ex
    return out


def _graph_devices(gm: fx.GraphModule) -> set:
    devs = set()
    for n in gm.graph.nodes:
        t = N.tensor_meta(n)
        if t is not None and t.device.type != "meta":
            devs.add(t.device)
    return devs


def kernels_can_run(gm: fx.GraphModule) -> Optional[str]:
    """None if our kernels can run this graph's attention, else the reason they cannot."""
    devs = _graph_devices(gm)
    cuda = [d for d in devs if d.type == "cuda"]
    if not cuda:
        return "tensors are on CPU: no fused kernel (set fa3_inductor.config.force_rewrite to use the reference)"
    if not all(hopper_available(d) for d in cuda):
        return "not an sm_90 (Hopper) GPU: our kernels need H100/H200"
    return None


def _site_why_not(site, spec) -> Optional[str]:
    """Per-site conditions for the rewrite on real hardware (force_rewrite skips them)."""
    qd = N.dtype(site.q)
    if qd not in (torch.float16, torch.bfloat16):
        return f"inputs are {qd}: the kernels run fp16/bf16 (eager keeps {qd} precision)"
    if spec.mask_kind is not None and _dense_rows(site):
        # Measured on the H100 (docs/perf.md): the fused kernel reading a dense [Sq, Sk] mask
        # tensor ran nanoGPT at 0.48x of Inductor; "never slower than inductor" wins.
        return ("a dense [Sq, Sk] mask tensor remains (its structure was not derived): the fused kernel "
                "with a dense mask is measured slower than Inductor; left to Inductor")
    if config.min_train_attention_flops and _needs_grad(site):
        flops = attention_flops(site, spec)
        if flops is not None and flops < config.min_train_attention_flops:
            return (f"training attention of {flops / 1e9:.3g} GFLOP per call (forward + backward) is below "
                    f"config.min_train_attention_flops={config.min_train_attention_flops:.3g}, where our op was "
                    "measured slower than Inductor (per-call host work; docs/perf-notes.md); left to Inductor")
    if site.is_sdpa:
        from . import sdpa_policy
        return sdpa_policy.why_not(site, spec)
    return None


def _needs_grad(site) -> bool:
    return any(getattr(N.tensor_meta(x), "requires_grad", False) for x in (site.q, site.k, site.v))


def _hint(x) -> Optional[int]:
    if isinstance(x, torch.SymInt):
        return x.node.hint
    return int(x)


def attention_flops(site, spec) -> Optional[float]:
    """Forward + backward FLOPs of one call (4*B*H*Sq*Sk*(D+Dv)/2 forward, x3.5 with the backward;
    causal halves), from the example sizes; None when a size has no hint."""
    q, k, v = (N.tensor_meta(x) for x in (site.q, site.k, site.v))
    if q is None or k is None or v is None:
        return None
    try:
        rows = 1
        for d in q.shape[:-1]:
            rows *= _hint(d)
        sk, d, dv = _hint(k.shape[-2]), _hint(q.shape[-1]), _hint(v.shape[-1])
    except TypeError:
        return None
    fwd = 2.0 * rows * sk * (d + dv) * (0.5 if spec.causal else 1.0)
    return 3.5 * fwd


def _dense_rows(site) -> bool:
    """Does the remaining mask/bias vary along the query axis (a full [.., Sq, Sk] tensor)?"""
    kind = site.bias[0] if site.bias else None
    nodes_ = [b for b, _, _ in site.bias[1]] if kind == "additive" else [c for c, _ in site.bias[1]] if kind else []
    if kind == "additive":
        nodes_ += [c for c, _, _ in site.bias[2]]
    for n in nodes_:
        sh = N.shape(n)
        if sh is None or (len(sh) >= 2 and str(sh[-2]) != "1"):
            return True
    return False


def analyse_and_rewrite(gm: fx.GraphModule, example_inputs, rewrite: bool = True,
                        autotune: bool = False) -> GraphReport:
    sites, unmatched = find_sites(gm, _example_of(gm, example_inputs))
    hw_reason = None if config.force_rewrite else kernels_can_run(gm)
    use_fp8 = config.fp8 and (config.fp8_training or not _is_training(example_inputs))
    matched = []
    dead_before = {n for n in gm.graph.nodes if not n.users}
    guarded: set = set()
    for site in sites:
        if use_fp8:
            site.spec_fields["fp8"] = True
        # The kernel runs (and picks its tiles) when the graph runs: this compile's settings go
        # with the site (config.kernel as patched by options, mode="max-autotune").
        site.spec_fields["kernel"] = config.kernel
        site.spec_fields["autotune"] = bool(autotune)
        site.spec_fields["deterministic_backward"] = bool(config.deterministic_backward)
        try:
            spec = build_spec(site)
        except ValueError as exc:
            unmatched.append(Unmatched(site.anchor, f"spec rejected: {exc}", site.source))
            continue
        site.spec = spec
        why_not = hw_reason
        if why_not is None and not config.force_rewrite:
            why_not = _site_why_not(site, spec)
        if why_not is None and site.is_sdpa and config.sdpa_rewrite == "never":
            why_not = "config.sdpa_rewrite='never'"
        do_it = rewrite and why_not is None
        if do_it:
            rewrite_site(gm, site, guarded)
            if config.log_rewrites:
                log.info("fa3: rewrote attention at %s -> %s", site.source or site.anchor.name, spec.describe())
        matched.append((site, do_it, why_not or ""))
    for um in unmatched:
        log.info("fa3: softmax left alone at %s: %s", um.source or um.anchor.name, um.reason)
    if any(done for _, done, _ in matched):
        remove_dead(gm, dead_before)
        gm.graph.lint()
        gm.recompile()
    report = GraphReport(matched, unmatched)
    REPORTS.append(report)
    del REPORTS[:-64]
    return report


def _is_training(example_inputs) -> bool:
    """A graph is a training graph when autograd is on and some input requires grad."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in example_inputs)


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of our own sources: part of Inductor's FX-graph cache key, so edits invalidate it."""
    h = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_key_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Fa3CacheKey(CustomGraphPass):
        def __call__(self, graph):
            return None

        def uuid(self) -> Optional[Any]:
            return ("fa3_inductor", code_hash())

    return Fa3CacheKey()


def inductor_patches(mode: Optional[str], options: Optional[dict], dynamic=None) -> dict:
    patches = {}
    if mode is not None and mode != "default":
        import torch._inductor as ind
        patches.update(ind.list_mode_options(mode, dynamic))
    patches.update(options or {})
    if "post_grad_custom_post_pass" not in patches:
        patches["post_grad_custom_post_pass"] = _cache_key_pass()
    return patches


def fa3_backend(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None,
                options: Optional[dict] = None, **kwargs):
    """torch.compile(model, backend="fa3", mode=..., options={...})."""
    ours, theirs = config_check.split_options(options)
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"torch.compile(backend='fa3'): mode={mode!r} is not allowed; choose one of "
                         "None, 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'")
    with config.patch(ours):
        config_check.validate()
        analyse_and_rewrite(gm, example_inputs, autotune=mode in ("max-autotune", "max-autotune-no-cudagraphs"))
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=inductor_patches(mode, theirs, kwargs.get("dynamic")))
