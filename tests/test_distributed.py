"""torch.compile(backend="fa3") under data-parallel training (DDP, FSDP2) on CPU/gloo, 2 ranks.

One `torch.distributed.run --nproc_per_node=2` launch of tests/distributed/train_worker.py trains
every case for 3 SGD steps (fp32, force_rewrite: our op runs the reference); a single-process run
of the same worker (same seeds, same global batch) runs at the same time and is the reference.
Checked per case and rank (tests/distributed/harness.py):

- losses per step and final (gathered) parameters equal the single-process run (fp32 bar);
  every rank holds identical final parameters;
- every attention layer runs through fa3::attention_fwd / attention_bwd on every step, and every
  softmax in every graph was rewritten (nothing unmatched or left alone);
- graphs: DDP with default buckets compiles one graph holding both sites (as single-process);
  DDP with 1 MB buckets (ddp_split, wider model) is split by DDPOptimizer into several graphs and
  each site survives whole in one of them; under FSDP2 (whole-model compile) the root forward runs
  eagerly (graph break in its block loop at the dynamo-disabled FSDP hooks) and one compiled block
  graph serves both blocks;
- no recompiles after the first step (none at all for DDP, single-process and nanoGPT/FSDP2).

The worker replaces Inductor's CPU code generation with AOTAutograd + eager (15-30 s per graph
otherwise); the fa3 backend itself (matcher, rewrite, custom op + autograd) is the real one.
"""
from __future__ import annotations

import pytest
import torch

from distributed import harness

pytestmark = pytest.mark.distributed

TIMEOUT_S = 170
CASES = harness.DIST_CASES
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return harness.launch(tmp_path_factory.mktemp("fa3_dist"), CASES, ["--device", "cpu"], timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("key", CASES)
def test_matches_single_process(runs, key):
    harness.check_matches_single(runs, key, LOSS_TOL, PARAM_TOL)


@pytest.mark.parametrize("key", CASES + harness.single_cases(CASES))
def test_attention_rewritten_and_no_recompiles(runs, key):
    harness.check_graphs(runs, key)


def test_runtime_budget(runs):
    assert runs["seconds"] < TIMEOUT_S, runs["seconds"]
