"""fa3_inductor settings, a torch config module (same machinery as torch._inductor.config).

    import fa3_inductor
    fa3_inductor.config.force_rewrite = True
    with fa3_inductor.config.patch(kernel="reference"): ...

Per compile, the same names can be given with an "fa3." prefix in torch.compile's
options: torch.compile(m, backend="fa3", options={"fa3.kernel": "triton"}); the other
options go to Inductor unchanged.  Settings are read when a graph is compiled; `kernel` and
`deterministic_backward`, which matter when the op runs, also go with each rewritten site
(AttentionSpec.kernel / .deterministic_backward), so the site runs with them.  `config_check.validate()` checks every value and names the bad one
(in config_check.py: a config module keeps only its settings).
"""
import sys

from torch.utils._config_module import install_config_module

# Rewrite attention even where no fused kernel can run (CPU, pre-Hopper GPUs); the
# rewritten op then executes the pure-PyTorch reference.  Tests use it.
force_rewrite: bool = False

# Which implementation runs the op on Hopper: "auto" (CUDA template where it supports the
# spec and is measured faster, else Triton), "triton", "cuda", or "reference".
kernel: str = "auto"

# FP8 (e4m3) forward with block scales and Hadamard incoherent processing, inference graphs.
fp8: bool = False
# Also use the FP8 forward inside training graphs (the backward stays bf16/fp16).
fp8_training: bool = False

# Existing F.scaled_dot_product_attention calls: "measured" rewrites one only where our
# kernel is in the measured table as faster than what SDPA runs for that spec and shape;
# "always" / "never" force the choice.
sdpa_rewrite: str = "measured"

# A mask that enters the graph as an input (built outside the compiled frame: FSDP2 blocks,
# per-layer compile, SDPA attn_mask from the caller) takes the structural route when its
# example is exactly causal / window / bidirectional with key padding; a device-side guard
# checks every call (patterns/mask_inputs.py).  False keeps such masks as tensors.
speculate_mask_inputs: bool = True

# Training sites (q, k or v need gradients) whose attention is smaller than this many FLOPs per
# call (forward + backward, causal halved) are left to Inductor.  Measured on the H100
# (docs/perf-notes.md): at 6e10 FLOP (Llama 8/2 heads, d128, B=2, S=2048) our forward+backward
# took 2.85 ms against Inductor's 0.85 ms, the per-call host work of the op dominating; at
# 4.8e11 (16 heads, S=4096) the fused path was faster.  0 rewrites every size.
min_train_attention_flops: float = 2.6e11

# The Triton implementation's forward on sm_90 runs the Gluon kernel (warp-specialised FA3-style:
# TMA producer warp, two consumer warpgroups in pingpong, softmax under the PV GEMM; ops/gluon_fwd.py)
# wherever it applies: head dim 128 or 256, fp16/bf16, no mask or causal, no bias / key padding /
# ALiBi / softcap / dropout, default tiles (triton_impl.gluon_supports says why not, explain()
# shows it).  Measured on the H100 at 0.88-1.13x cuDNN at d128/d256 (session 9, docs/perf.md),
# the tl-level kernel 0.67-0.80x.  False: always the tl-level kernel.  Read when the op runs (not a
# per-compile "fa3." option: config_check rejects it there).
gluon_forward: bool = True

# The Triton implementation's backward (also the CUDA template's backward) on sm_90 runs the Gluon
# kernel (warp-specialised FA3-style: TMA producer warp, two consumer warpgroups with dK/dV in
# registers, dQ-writer warps; ops/gluon_bwd.py) wherever it applies: head dim 64,
# 128 or 256, fp16/bf16, no mask or causal, no bias / key padding / ALiBi / softcap / dropout, GQA
# "div", default tiles (triton_impl.gluon_bwd_supports says why not, explain() shows it).  With
# deterministic_backward (the default) only where its ordered-dQ mode measured faster than the tl
# kernels (triton_impl.deterministic_tl_reason: from 4k keys, d128 causal from 1k); with it off,
# dQ summed by atomics, every head dim.  False: always the tl-level kernels.  Read when the op
# runs (not a per-compile "fa3." option: config_check rejects it there).
gluon_backward: bool = True

# Leave rewritten sites' source lines in the log at INFO level.
log_rewrites: bool = True

# True (the rule: deterministic unless a flag allows atomics): bit-identical gradients
# run to run.  False: dQ summed with fp32 atomics (the order varies), in the Gluon backward where
# it applies (0.89-0.99x cuDNN at head dims 64/128, 0.68-0.80x at 256 on the H100, against the
# deterministic 0.58-0.95x; docs/perf.md, session 10), else inside the tl dK/dV kernel (slower
# than the tl default there).  Calls with a bias gradient keep the deterministic path.
deterministic_backward: bool = True

install_config_module(sys.modules[__name__])
