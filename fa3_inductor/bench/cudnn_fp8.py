"""cuDNN's FP8 attention as a benchmark peer, through the cuDNN frontend's Python graph API.

torch 2.11's F.scaled_dot_product_attention refuses float8 inputs ("No available kernel"), so
the FP8 rows reach cuDNN's FP8 SDPA directly: the optional package `nvidia-cudnn-frontend`
(`import cudnn`; it loads the libcudnn that torch's wheel ships).  It is a peer for the benchmark
only, never a dependency of the product path.

The graph takes e4m3 Q, K, V in [B, H, S, D] with unit descales (timing does not depend on the
values), and writes O in bf16 where this cuDNN supports that, else in e4m3 (the note says which).
"""
from __future__ import annotations

import importlib

import torch

_GRAPHS: dict = {}  # shape / strides / causal / scale -> (graph, variant pack, workspace, out, note, (tq, tk, tv))


def _build(q8, k8, v8, causal, scale):
    import cudnn  # noqa: PLC0415 - optional peer
    dev = q8.device
    ones = {n: torch.ones(1, 1, 1, 1, device=dev, dtype=torch.float32)
            for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
    amax = {n: torch.zeros(1, 1, 1, 1, device=dev, dtype=torch.float32) for n in ("amax_s", "amax_o")}
    reasons = []
    for out_dtype, cu_dtype in ((torch.bfloat16, cudnn.data_type.BFLOAT16),
                                (torch.float8_e4m3fn, cudnn.data_type.FP8_E4M3)):
        try:
            g = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3,
                              intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT)
            tq, tk, tv = (g.tensor_like(t) for t in (q8, k8, v8))
            ts = {n: g.tensor_like(t) for n, t in ones.items()}
            ret = g.sdpa_fp8(q=tq, k=tk, v=tv, is_inference=True, attn_scale=scale,
                             use_causal_mask=causal, name="sdpa_fp8", **ts)
            o, amax_s, amax_o = ret[0], ret[-2], ret[-1]  # (o, [stats,] amax_s, amax_o)
            out = torch.empty(q8.shape[:-1] + v8.shape[-1:], device=dev, dtype=out_dtype)
            o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(cu_dtype)
            for t in (amax_s, amax_o):
                t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
                    cudnn.data_type.FLOAT)
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            ws = torch.empty(max(1, g.get_workspace_size()), device=dev, dtype=torch.uint8)
            pack = {tq: q8, tk: k8, tv: v8, o: out, amax_s: amax["amax_s"], amax_o: amax["amax_o"]}
            pack.update({ts[n]: ones[n] for n in ones})
            note = f"cuDNN FP8 via cudnn-frontend {getattr(cudnn, '__version__', '?')}, O in {str(out_dtype)[6:]}"
            return g, pack, ws, out, note, (tq, tk, tv)
        except Exception as exc:  # noqa: BLE001 - try the next output type, then report
            reasons.append(f"O {str(out_dtype)[6:]}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    raise RuntimeError("; ".join(reasons))


def _key(q8, k8, v8, causal, scale):
    return (tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(), tuple(v8.shape), v8.stride(),
            causal, float(scale))


def _bound(key, q8, k8, v8):
    """The cached graph with this call's Q, K, V in its variant pack: a graph is built once per
    shape, and a pack still holding the first call's tensors would run on those (a later output
    then compared against other inputs, relative error ~1.4)."""
    g, pack, ws, out, note, (tq, tk, tv) = _GRAPHS[key]
    pack[tq], pack[tk], pack[tv] = q8, k8, v8
    return g, pack, ws, out, note


def sdpa_fp8_ms(q8, k8, v8, causal: bool, scale: float, time_ms):
    """(ms, note) of cuDNN's FP8 SDPA on e4m3 [B, H, S, D] inputs, or (None, reason)."""
    try:
        importlib.import_module("cudnn")
    except Exception as exc:  # noqa: BLE001
        return None, f"cuDNN FP8: cudnn-frontend not importable ({type(exc).__name__})"
    key = _key(q8, k8, v8, causal, scale)
    try:
        if key not in _GRAPHS:
            _GRAPHS[key] = _build(q8, k8, v8, causal, scale)
        g, pack, ws, _out, note = _bound(key, q8, k8, v8)
        g.execute(pack, ws)
        torch.cuda.synchronize()
        return time_ms(lambda: g.execute(pack, ws)), note
    except Exception as exc:  # noqa: BLE001 - the column then says n/a, with the reason
        return None, f"cuDNN FP8 (frontend): {type(exc).__name__}: {str(exc)[:200]}"


def sdpa_fp8_out(q8, k8, v8, causal: bool, scale: float):
    """cuDNN's FP8 output for a sanity check of the peer (the graph must exist: time it first)."""
    g, pack, ws, out, _ = _bound(_key(q8, k8, v8, causal, scale), q8, k8, v8)
    g.execute(pack, ws)
    torch.cuda.synchronize()
    return out.float()
