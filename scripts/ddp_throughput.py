"""DDP training throughput, torch.compile(backend="fa3") vs backend="inductor", on 2 GPUs.

    python scripts/ddp_throughput.py                 # re-launches itself under torch.distributed.run
    python -m torch.distributed.run --nproc_per_node=2 scripts/ddp_throughput.py --steps 10

Model: HF Llama from LlamaConfig (no weights): hidden 1024, 4 layers, 8 heads, 2 kv heads (GQA),
intermediate 2816, vocab 32000, seq 2048, bf16 parameters, eager attention (what fa3 rewrites;
Inductor gets the same model), AdamW (fused), per-rank batch --batch.  Each variant: build,
DDP-wrap, compile, --warmup steps (compiles), then --steps timed steps (cuda synchronize
around the timed loop).  Rank 0 prints one table line per variant:

    variant  tokens/s (global)  ms/step  peak GiB  attention sites rewritten  graphs  recompiles

"inductor-sdpa" (optional) is the same model with attn_implementation="sdpa" under Inductor.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="inductor,fa3,fa3-all",
                    help="comma list: fa3, fa3-all (size policy off: every site rewritten), inductor, inductor-sdpa")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    return ap.parse_args()


def relaunch(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           os.path.abspath(__file__), *sys.argv[1:]]
    return subprocess.call(cmd)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant, args, rank, world, device):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from fa3_inductor import backend as fa3_backend_mod

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fa3_backend_mod.REPORTS.clear()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                      attn_implementation="sdpa" if variant == "inductor-sdpa" else "eager",
                      use_cache=False, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    ddp = DDP(model, device_ids=[device.index])
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=True)
    opts = {"fa3.min_train_attention_flops": 0} if variant == "fa3-all" else None
    compiled = torch.compile(ddp, backend="fa3" if variant.startswith("fa3") else "inductor", options=opts)
    g = torch.Generator().manual_seed(1234 + rank)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
               for _ in range(4)]

    def step(i):
        toks = batches[i % len(batches)]
        logits = compiled(input_ids=toks[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), toks[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    graphs_warm = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    t = torch.tensor([dt], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dt = t.item()
    peak = torch.cuda.max_memory_allocated() / 2**30
    rewritten = sum(1 for r in fa3_backend_mod.REPORTS for _, done, _ in r.matched if done)
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    tokens = args.steps * args.batch * args.seq * world
    row = dict(variant=variant, tok_s=tokens / dt, ms=1e3 * dt / args.steps, peak=peak,
               rewritten=rewritten if variant.startswith("fa3") else "-", graphs=graphs,
               new_graphs_after_warmup=graphs - graphs_warm, warm_s=warm_s, loss=float(loss))
    compiled = ddp = model = opt = None  # free the variant before the next one
    torch.cuda.empty_cache()
    return row


def main():
    args = parse()
    if "RANK" not in os.environ:
        return relaunch(args)
    import torch
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl")
    rows = []
    for v in [v for v in args.variants.split(",") if v]:
        try:
            rows.append(run_variant(v, args, rank, world, device))
        except Exception as exc:  # noqa: BLE001 - one failing variant still leaves the others' lines
            rows.append(dict(variant=v, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            if rank == 0:
                import traceback
                traceback.print_exc()
            break  # collectives may be out of step: stop
    if rank == 0:
        name = torch.cuda.get_device_name(device)
        print(f"# DDP x{world} {name}, Llama h{args.hidden} L{args.layers} H{args.heads}/{args.kv_heads} "
              f"seq {args.seq} batch/rank {args.batch} bf16, {args.steps} timed steps after {args.warmup} warm-up")
        print(f"{'variant':<14} {'tokens/s':>10} {'ms/step':>9} {'peak GiB':>9} {'fa3 sites':>9} "
              f"{'graphs':>6} {'recompiled':>10} {'warmup s':>9} {'loss':>7}")
        for r in rows:
            if "error" in r:
                print(f"{r['variant']:<14} ERROR {r['error']}")
                continue
            print(f"{r['variant']:<14} {r['tok_s']:>10.0f} {r['ms']:>9.1f} {r['peak']:>9.2f} {str(r['rewritten']):>9} "
                  f"{r['graphs']:>6} {r['new_graphs_after_warmup']:>10} {r['warm_s']:>9.1f} {r['loss']:>7.3f}")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
