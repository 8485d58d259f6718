"""Data-parallel training with torch.compile(backend="fa3"): one worker of a multi-process run.

Launch (2 ranks, CPU/gloo):

    python -m torch.distributed.run --nproc_per_node=2 --master_port=29511 \
        tests/distributed/train_worker.py --out /tmp/fa3_dist/{rank}.json

or without torch.distributed (the single-process reference, same global batch):

    python tests/distributed/train_worker.py --mode single --out /tmp/fa3_dist/single.json

Each run trains every (model, wrapper) case of --models x --modes for --steps SGD steps from
fixed seeds: a tiny HF Llama (GQA, eager attention) and a tiny nanoGPT (registered tril buffer),
wrapped in DDP or FSDP2 (`fully_shard` per block, then the root), compiled with
torch.compile(model, backend="fa3") under fa3_inductor.config.force_rewrite.  The global batch
is fixed; rank r trains rows [r*B/W, (r+1)*B/W).  The JSON of each rank holds, per case:
the global loss per step (the mean over ranks of the local mean loss = the loss of the global
batch), a checksum of the final full parameters (FSDP2 shards gathered with
DTensor.full_tensor(); the tensors themselves go to <out>.params.pt),
the attention sites rewritten in this rank's graphs (fa3_inductor.backend.REPORTS), the number
of Dynamo graphs / frames compiled and the number of recompiles (recompile reasons captured
from Dynamo's "recompiles" log).

--codegen aot_eager (the CPU tests' default) keeps the real fa3 backend (option check, matcher,
rewrite, REPORTS, custom op + autograd) and replaces only Inductor's code generation by
AOTAutograd + eager, as tests/helpers.py's fast_fa3 does: Inductor's CPU codegen costs 15-30 s
per graph on a 2-core machine.  --codegen inductor (the GPU default) runs everything.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import fa3_inductor
from fa3_inductor import backend as fa3_backend_mod

VOCAB, SEQ, HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 16, 32, 2, 4, 2
GLOBAL_BATCH = 4
LR = 0.1
# ddp_split: DDPOptimizer always makes its first bucket 1 MiB (torch.distributed.
# _DEFAULT_FIRST_BUCKET_BYTES) and asserts bucket_cap_mb >= that, so the model must be wider than
# the tiny default for bucket_cap_mb=1 to split the graph: hidden 256 gives 2-3 MB per block.
SPLIT_DIMS = {"hidden": 256}
SPLIT_BUCKET_MB = 1.0


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: fused qkv, registered tril buffer, masked_fill(-inf), softmax."""

    def __init__(self, C, nh, T):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.nh = nh
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.nh, C // self.nh).transpose(1, 2)
        q = q.view(B, T, self.nh, C // self.nh).transpose(1, 2)
        v = v.view(B, T, self.nh, C // self.nh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, C, nh, T):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C)
        self.attn = CausalSelfAttention(C, nh, T)
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=VOCAB, hidden=HIDDEN, heads=HEADS, seq=SEQ, layers=LAYERS):
        super().__init__()
        C, nh, T, n_layer = hidden, heads, seq, layers
        self.wte = nn.Embedding(vocab, C)
        self.wpe = nn.Embedding(T, C)
        self.blocks = nn.ModuleList([Block(C, nh, T) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, vocab, bias=False)

    def forward(self, idx):
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


class LlamaLM(nn.Module):
    """HF LlamaForCausalLM returning plain logits (loss is computed outside, like nanoGPT's)."""

    def __init__(self, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                 seq=SEQ, dtype=torch.float32):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, max_position_embeddings=max(seq, 64),
                          attn_implementation="eager", use_cache=False, tie_word_embeddings=False)
        self.lm = LlamaForCausalLM(cfg).to(dtype)

    @property
    def blocks(self):
        return self.lm.model.layers

    def forward(self, idx):
        return self.lm(input_ids=idx, use_cache=False).logits


def build_model(name, device, dtype=torch.float32, **dims):
    torch.manual_seed(0)
    if name == "llama":
        m = LlamaLM(dtype=dtype, **dims)
    elif name == "nanogpt":
        m = NanoGPT(**dims).to(dtype)
    else:
        raise ValueError(f"unknown model {name!r}")
    return m.to(device)


def data(step, batch=GLOBAL_BATCH, seq=SEQ, vocab=VOCAB):
    """The global batch of a step: (inputs, targets), [batch, seq] int64, same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    toks = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return toks[:, :-1], toks[:, 1:]


# ---------------------------------------------------------------------------------------------
# compile accounting
# ---------------------------------------------------------------------------------------------
class RecompileLog(logging.Handler):
    """Collects Dynamo's recompile reasons (artifact logger "recompiles")."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: list = []

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            msg = str(record.msg)
        if "ecompil" in msg:
            self.reasons.append(msg.strip()[:2000])


@contextlib.contextmanager
def recompile_capture():
    handler = RecompileLog()
    torch._logging.set_logs(recompiles=True)
    lg = logging.getLogger("torch._dynamo.guards")
    lg.addHandler(handler)
    # keep the log in our JSON, not on stderr of every rank
    prop, lg.propagate = lg.propagate, False
    try:
        yield handler
    finally:
        lg.removeHandler(handler)
        lg.propagate = prop
        torch._logging.set_logs()


class OpCalls:
    """Counts run-time calls of fa3::attention_fwd / fa3::attention_bwd (every implementation
    ends in fully_masked.fix_forward / fix_backward, called once per op call)."""

    def __init__(self):
        self.fwd = 0
        self.bwd = 0
        self.fwd_impls: dict = {}   # implementation module -> forward calls

    @contextlib.contextmanager
    def active(self):
        from fa3_inductor.ops import dispatch, fully_masked
        f0, b0, c0 = fully_masked.fix_forward, fully_masked.fix_backward, dispatch.choose_forward

        def choose_forward(*a, **k):
            impl = c0(*a, **k)
            name = getattr(impl, "__name__", str(impl)).rsplit(".", 1)[-1]
            self.fwd_impls[name] = self.fwd_impls.get(name, 0) + 1
            return impl

        def fwd(*a, **k):
            self.fwd += 1
            return f0(*a, **k)

        def bwd(*a, **k):
            self.bwd += 1
            return b0(*a, **k)
        with mock.patch.object(fully_masked, "fix_forward", fwd), \
                mock.patch.object(fully_masked, "fix_backward", bwd), \
                mock.patch.object(dispatch, "choose_forward", choose_forward):
            yield self


def _aot_eager_compile_fx(gm, example_inputs, config_patches=None, **_):
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def codegen_ctx(codegen):
    if codegen == "aot_eager":
        return mock.patch("torch._inductor.compile_fx.compile_fx", _aot_eager_compile_fx)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# one training case
# ---------------------------------------------------------------------------------------------
def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def wrap(model, mode, device, bucket_cap_mb):
    if mode in ("single", "single_split"):
        return model
    if mode in ("ddp", "ddp_split"):
        if mode == "ddp_split" and bucket_cap_mb is None:
            bucket_cap_mb = SPLIT_BUCKET_MB
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        kw = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
        return DDP(model, device_ids=ids, **kw)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown mode {mode!r}")


def run_case(model_name, mode, *, device, steps, codegen, world, rank, bucket_cap_mb=None,
             dtype=torch.float32, dims=None, batch=GLOBAL_BATCH, seq=SEQ, force_rewrite=True):
    dims = dict(SPLIT_DIMS if mode.endswith("_split") else {}, **(dims or {}))
    vocab = dims.get("vocab", VOCAB)
    torch._dynamo.reset()
    fa3_backend_mod.REPORTS.clear()
    torch._dynamo.utils.counters.clear()
    model = build_model(model_name, device, dtype, **dims)
    n_attn = len(model.blocks)
    model = wrap(model, mode, device, bucket_cap_mb)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    compiled = torch.compile(model, backend="fa3")
    assert batch % world == 0
    lb = batch // world
    losses, step_s, fwd_calls, bwd_calls, graphs_after, recompiles_after = [], [], [], [], [], []
    ops = OpCalls()
    # the tests check our kernels at small sizes: the measured size policy (left to Inductor below
    # config.min_train_attention_flops) is off here
    with fa3_inductor.config.patch(force_rewrite=force_rewrite, min_train_attention_flops=0), codegen_ctx(codegen), recompile_capture() as rc, \
            ops.active():
        for step in range(steps):
            f0, b0 = ops.fwd, ops.bwd
            t0 = time.perf_counter()
            x, y = data(step, batch, seq, vocab)
            x, y = x[rank * lb:(rank + 1) * lb].to(device), y[rank * lb:(rank + 1) * lb].to(device)
            logits = compiled(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            g = loss.detach().clone()
            if world > 1:
                torch.distributed.all_reduce(g)
                g /= world
            losses.append(g.item())
            step_s.append(time.perf_counter() - t0)
            fwd_calls.append(ops.fwd - f0)
            bwd_calls.append(ops.bwd - b0)
            graphs_after.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
            recompiles_after.append(len(rc.reasons))
    sd = {}
    base = model.module if mode.startswith("ddp") else model
    for name, p in base.named_parameters():
        sd[name] = _full(p.detach()).float().cpu()
    flat = torch.cat([sd[k].reshape(-1) for k in sorted(sd)])
    reports = list(fa3_backend_mod.REPORTS)
    per_graph = [sum(1 for _, done, _ in r.matched if done) for r in reports]
    out = {
        "model": model_name, "mode": mode, "world": world, "rank": rank, "steps": steps,
        "codegen": codegen, "n_attention_layers": n_attn, "dtype": str(dtype).replace("torch.", ""),
        "force_rewrite": force_rewrite,
        "losses": losses,
        "step_seconds": step_s,
        "param_checksum": float(flat.double().sum()),
        "param_abs_checksum": float(flat.double().abs().sum()),
        "param_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "rewritten_per_graph": per_graph,
        "rewritten_total": sum(per_graph),
        "not_rewritten": [f"{s.source}: {why}" for r in reports for s, done, why in r.matched if not done],
        # the causal mask must be derived (kernel structure), not passed as a dense tensor
        "dense_masks": [f"{s.source}: {s.spec.describe()} {s.notes}" for r in reports for s, done, _ in r.matched
                        if s.spec is not None and (s.spec.mask_kind is not None or not s.spec.causal)],
        "unmatched": [f"{u.source}: {u.reason}" for r in reports for u in r.unmatched],
        "backend_calls": len(reports),
        "unique_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "frames_ok": int(torch._dynamo.utils.counters["frames"]["ok"]),
        "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())),
        "graph_break_reasons": sorted(torch._dynamo.utils.counters["graph_break"])[:20],
        "recompiles": len(rc.reasons),
        "unique_graphs_after_step": graphs_after,
        "recompiles_after_step": recompiles_after,
        "op_fwd_calls_per_step": fwd_calls,
        "op_bwd_calls_per_step": bwd_calls,
        "op_fwd_implementations": ops.fwd_impls,
        "recompile_reasons": rc.reasons[:10],
    }
    del compiled, model, opt
    return out, sd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON path; '{rank}' is replaced by the rank")
    ap.add_argument("--mode", default="ddp,fsdp2",
                    help="comma list of ddp, ddp_split, fsdp2 (2+ ranks) or single, single_split (no "
                         "torch.distributed; single_split is the reference of ddp_split)")
    ap.add_argument("--models", default="llama,nanogpt")
    ap.add_argument("--cases", default=None,
                    help="comma list of model/mode (e.g. llama/ddp,nanogpt/ddp_split); overrides --mode/--models")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default=None, help="process-group backend (gloo for cpu, nccl for cuda)")
    ap.add_argument("--codegen", default=None, choices=["inductor", "aot_eager"],
                    help="default: aot_eager on cpu, inductor on cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--force-rewrite", default=None, choices=["0", "1"],
                    help="fa3_inductor.config.force_rewrite (default: 1 on cpu, 0 on cuda, where the "
                         "bf16/fp16 sites are rewritten to the real kernels)")
    ap.add_argument("--hidden", type=int, default=None,
                    help=f"model width for every case (default {HIDDEN}; {SPLIT_DIMS['hidden']} for *_split)")
    ap.add_argument("--bucket-cap-mb", type=float, default=None,
                    help="DDP bucket size (small values make DDPOptimizer split the graph)")
    args = ap.parse_args(argv)
    force_rewrite = (args.device == "cpu") if args.force_rewrite is None else args.force_rewrite == "1"
    codegen = args.codegen or ("aot_eager" if args.device == "cpu" else "inductor")
    if args.cases:
        cases = [tuple(c.split("/")) for c in args.cases.split(",") if c]
    else:
        cases = [(name, mode) for mode in args.mode.split(",") if mode
                 for name in args.models.split(",") if name]
    modes = {mode for _, mode in cases}
    single = {"single", "single_split"}
    distributed = bool(modes - single)
    rank, world = 0, 1
    if distributed:
        if modes & single:
            ap.error("single / single_split run without torch.distributed; give them alone")
        import torch.distributed as dist
        pg_backend = args.backend or ("gloo" if args.device == "cpu" else "nccl")
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(pg_backend, timeout=datetime.timedelta(seconds=120))
    if args.device == "cpu":
        torch.set_num_threads(1)  # two ranks on a small machine: no oversubscription
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    results = {"rank": rank, "world": world, "device": str(device), "torch": torch.__version__,
               "cases": {}, "errors": {}}
    params = {}
    for name, mode in cases:
        key = f"{name}/{mode}"
        t0 = time.perf_counter()
        try:
            res, sd = run_case(name, mode, device=device, steps=args.steps, codegen=codegen,
                           world=world, rank=rank, bucket_cap_mb=args.bucket_cap_mb,
                           dtype=getattr(torch, args.dtype), force_rewrite=force_rewrite,
                           dims={"hidden": args.hidden} if args.hidden else None)
            res["seconds"] = time.perf_counter() - t0
            results["cases"][key] = res
            params[key] = sd
        except Exception as exc:  # noqa: BLE001 -- recorded, the test reports it
            import traceback
            results["errors"][key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
            print(f"[rank {rank}] {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if distributed:
                break  # a failed collective can leave the group unusable: keep what we have
        print(f"[rank {rank}] {key} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    path = args.out.replace("{rank}", str(rank))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # final full parameters, per case: torch.load(<out>.params.pt)[case][name] (fp32, cpu)
    torch.save(params, path + ".params.pt")
    with open(path, "w") as f:
        json.dump(results, f)
    if distributed:
        import torch.distributed as dist
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
