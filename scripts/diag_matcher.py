"""Device diagnostic: does the mask structure analysis agree with the CPU machine?
Prints versions and, per site, the matcher's notes (mask route, residuals, reasons)."""
import sympy
import torch
import transformers as T

import fa3_inductor
from fa3_inductor.backend import REPORTS
from fa3_inductor.bench.models import NanoGPT

print("torch", torch.__version__, "sympy", sympy.__version__, "transformers", T.__version__)
for dev in ("cpu", "cuda"):
    m = NanoGPT(T=64).to(device=dev, dtype=torch.bfloat16).eval()
    x = torch.randn(2, 64, 2048, dtype=torch.bfloat16, device=dev)
    REPORTS.clear()
    with torch.no_grad():
        fa3_inductor.explain(m, x=x)
    for rep in REPORTS:
        for s, _, why in rep.matched:
            print(dev, "nanogpt", s.spec.describe(), s.notes[2:], why[:60])
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=64, n_head=4, n_layer=1, n_positions=128, vocab_size=100, attn_implementation="eager")
    g = T.GPT2LMHeadModel(cfg).to(device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, 100, (2, 40), device=dev)
    am = torch.ones_like(ids); am[0, :7] = 0
    REPORTS.clear()
    fa3_inductor.explain(g, input_ids=ids, attention_mask=am)
    for rep in REPORTS:
        for s, _, why in rep.matched:
            print(dev, "gpt2", s.spec.describe(), s.notes[2:], why[:60])
