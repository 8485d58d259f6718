"""torch.compile(backend="fa3") under DDP and FSDP2 on 2 Hopper GPUs (nccl): the CPU test
(tests/test_distributed.py) with real Inductor code generation and our fused kernels.

bf16 models (the kernels run fp16/bf16; fp32 sites are left to Inductor on GPU), hidden 256
(head dim 64, GQA 4/2 for Llama), no force_rewrite: every site must be rewritten because the
hardware supports it, and every forward call must run a fused kernel, not the reference.
Bar: bf16 training of 3 SGD steps, DDP/FSDP2 (bf16 gradient reduction across 2 ranks) vs one
process: losses within 2e-2 relative, parameters within 1 bf16 ulp-ish (atol/rtol 1.6e-2).
"""
import pytest
import torch

from distributed import harness

pytestmark = pytest.mark.gpu


def _two_hoppers():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return False
    return all(torch.cuda.get_device_capability(i) == (9, 0) for i in range(2))


if not _two_hoppers():
    pytest.skip("needs 2 sm_90 (Hopper) GPUs", allow_module_level=True)
if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
    pytest.skip("needs torch.distributed with nccl", allow_module_level=True)

TIMEOUT_S = 200
CASES = harness.DIST_CASES
LOSS_TOL = dict(rtol=2e-2, atol=2e-2)
PARAM_TOL = dict(rtol=1.6e-2, atol=1.6e-2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fa3_dist_gpu")
    args = ["--device", "cuda", "--backend", "nccl", "--dtype", "bfloat16", "--hidden", "256",
            "--codegen", "inductor", "--force-rewrite", "0"]
    return harness.launch(out, CASES, args, timeout_s=TIMEOUT_S,
                          env={"TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")})


@pytest.mark.parametrize("key", CASES)
def test_matches_single_process(runs, key):
    harness.check_matches_single(runs, key, LOSS_TOL, PARAM_TOL)


@pytest.mark.parametrize("key", CASES + harness.single_cases(CASES))
def test_attention_rewritten_and_no_recompiles(runs, key):
    harness.check_graphs(runs, key, fused_kernels=True)
