"""Model grid: real attention code compiled with backend="fa3" next to "inductor" and eager.

Models (2 layers each, hidden 2048, head dim 128, bf16): nanoGPT causal, HF Llama eager
(GQA 4:1), HF Llama and Mistral with transformers' default sdpa attention on a padded
batch (SDPA then gets a 4-D mask), GPT-2, BERT, ViT.  Forward (inference) and a training
step (forward + backward).  Reported: ms per call and the attention TFLOP/s implied
(attention FLOPs only, so the number shows how fast attention runs inside the model).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class NanoGPTBlock(nn.Module):
    def __init__(self, C=2048, H=16, T=4096):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.H = H
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.H, C // self.H).transpose(1, 2)
        q = q.view(B, T, self.H, C // self.H).transpose(1, 2)
        v = v.view(B, T, self.H, C // self.H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    def __init__(self, layers=2, T=4096):
        super().__init__()
        self.blocks = nn.ModuleList([NanoGPTBlock(T=T) for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _hf(name: str, seqlen: int, attn: str):
    import transformers as T
    common = dict(num_hidden_layers=2, attn_implementation=attn)
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=seqlen, **common)
        return T.LlamaForCausalLM(cfg), "ids"
    if name == "mistral":
        cfg = T.MistralConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                              num_key_value_heads=4, vocab_size=32000, sliding_window=seqlen // 4,
                              max_position_embeddings=seqlen, **common)
        return T.MistralForCausalLM(cfg), "ids"
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=2048, n_head=16, n_layer=2, n_positions=seqlen, vocab_size=32000,
                           attn_implementation=attn)
        return T.GPT2LMHeadModel(cfg), "ids"
    if name == "bert":
        cfg = T.BertConfig(hidden_size=2048, num_attention_heads=16, intermediate_size=8192,
                           max_position_embeddings=seqlen, vocab_size=32000, **common)
        return T.BertModel(cfg), "ids"
    if name == "vit":
        side = int(math.sqrt(seqlen)) * 16
        cfg = T.ViTConfig(hidden_size=2048, num_attention_heads=16, intermediate_size=8192,
                          image_size=side, patch_size=16, **common)
        return T.ViTModel(cfg), "pixels"
    raise ValueError(name)


CASES = [
    # (name, attention implementation, padded batch, causal)
    ("nanogpt", None, False, True),
    ("llama", "eager", False, True),
    ("llama", "sdpa", True, True),
    ("mistral", "sdpa", True, True),
    ("gpt2", "eager", False, True),
    ("bert", "eager", True, False),
    ("vit", "eager", False, False),
]


def _inputs(kind, batch, seqlen, device, padded):
    if kind == "pixels":
        side = int(math.sqrt(seqlen)) * 16
        return dict(pixel_values=torch.randn(batch, 3, side, side, device=device, dtype=torch.bfloat16))
    ids = torch.randint(0, 32000, (batch, seqlen), device=device)
    kw = dict(input_ids=ids)
    if padded:
        am = torch.ones(batch, seqlen, dtype=torch.long, device=device)
        am[0, : seqlen // 8] = 0  # left padding in one row
        kw["attention_mask"] = am
    return kw


def _attn_flops(batch, seqlen, hidden=2048, layers=2, causal=True, train=False):
    f = 4 * batch * seqlen * seqlen * hidden * layers * (0.5 if causal else 1.0)
    return f * (3.5 if train else 1.0)


def run(seqlens=(1024, 4096), backends=("eager", "inductor", "fa3"), train=(False, True), cases=None,
        time_budget_s=300.0, progress=print):
    import triton.testing

    device = "cuda"
    rows = []
    start = time.time()
    for name, attn, padded, causal in (cases or CASES):
        for seqlen in seqlens:
            batch = max(1, 8192 // seqlen)
            for is_train in train:
                if name in ("bert", "vit", "gpt2", "mistral") and is_train:
                    continue  # keep the grid inside one device call
                if time.time() - start > time_budget_s:
                    progress(f"model grid: time budget spent, skipping {name} {seqlen}")
                    continue
                torch.manual_seed(0)
                if name == "nanogpt":
                    model, kind = NanoGPT(T=seqlen), "x"
                else:
                    model, kind = _hf(name, seqlen, attn)
                model = model.to(device=device, dtype=torch.bfloat16)
                model.train(is_train)
                if kind == "x":
                    inputs = dict(x=torch.randn(batch, seqlen, 2048, device=device, dtype=torch.bfloat16))
                else:
                    inputs = _inputs(kind, batch, seqlen, device, padded)
                row = dict(model=name, attn=attn or "-", padded=padded, seqlen=seqlen, batch=batch,
                           mode="train" if is_train else "infer")
                bes = list(backends) + (["fa3_sdpa_always"] if attn == "sdpa" and "fa3" in backends else [])
                for be in bes:
                    torch._dynamo.reset()
                    if be == "eager":
                        fn = model
                    elif be == "fa3_sdpa_always":
                        # What the SDPA policy would gain: our kernel forced on the SDPA sites.
                        fn = torch.compile(model, backend="fa3", options={"fa3.sdpa_rewrite": "always"})
                    else:
                        fn = torch.compile(model, backend=be)

                    def step():
                        with torch.set_grad_enabled(is_train):
                            out = fn(**inputs)
                            t = out if isinstance(out, torch.Tensor) else (
                                out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state)
                            if is_train:
                                t.float().mean().backward()
                            return t
                    try:
                        t0 = time.time()
                        step()
                        torch.cuda.synchronize()
                        row[f"compile_s_{be}"] = round(time.time() - t0, 1)
                        ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                        row[f"ms_{be}"] = ms
                        row[f"attn_tflops_{be}"] = _attn_flops(batch, seqlen, causal=causal, train=is_train) / (ms * 1e9)
                    except Exception as exc:  # noqa: BLE001 - a failing cell is reported, not fatal
                        row[f"ms_{be}"] = float("nan")
                        row[f"err_{be}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    model.zero_grad(set_to_none=True)
                if "ms_inductor" in row and "ms_fa3" in row:
                    row["fa3_vs_inductor"] = row["ms_inductor"] / row["ms_fa3"]
                rows.append(row)
                progress(_fmt(row))
                del model
                torch.cuda.empty_cache()
    return rows


def _fmt(row) -> str:
    cells = [f"{row['model']:<8}", f"{row['attn']:<5}", f"pad={int(row['padded'])}", f"s={row['seqlen']:<5}",
             f"{row['mode']:<5}"]
    for be in ("eager", "inductor", "fa3", "fa3_sdpa_always"):
        if f"ms_{be}" in row:
            cells.append(f"{be}={row[f'ms_{be}']:.2f}ms({row.get(f'attn_tflops_{be}', float('nan')):.0f}TF)")
    if "fa3_vs_inductor" in row:
        cells.append(f"fa3/inductor speedup={row['fa3_vs_inductor']:.2f}x")
    for be in ("eager", "inductor", "fa3", "fa3_sdpa_always"):
        if f"err_{be}" in row:
            cells.append(f"[{be} failed: {row[f'err_{be}']}]")
    return " ".join(cells)


def main(argv=None) -> int:
    import argparse
    import csv
    import os
    import sys

    ap = argparse.ArgumentParser(prog="python -m fa3_inductor.bench --models")
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--cases", default="all", help="comma list of model names, or 'all'")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--budget-s", type=float, default=220.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = CASES if args.cases == "all" else [c for c in CASES if c[0] in args.cases.split(",")]
    rows = run(seqlens=tuple(int(s) for s in args.seqlens.split(",")), cases=cases,
               train=(False,) if args.no_train else (False, True), time_budget_s=args.budget_s,
               progress=lambda s: print(s, file=sys.stderr, flush=True))
    print("model grid (bf16, 2 layers, hidden 2048, head dim 128); attention TFLOP/s implied by the step time")
    for row in rows:
        print(_fmt(row))
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        keys = sorted({k for r in rows for k in r})
        with open(os.path.join(args.out, "models.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0
