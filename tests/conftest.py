"""Shared fixtures of the CPU suite: a clean Dynamo state, empty REPORTS, fixed seeds and the
fa3 config restored around every test."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fa3_inductor  # noqa: E402
from fa3_inductor import backend as _backend  # noqa: E402
from fa3_inductor.ops import triton_impl as _triton_impl  # noqa: E402

_CONFIG_NAMES = ("force_rewrite", "kernel", "fp8", "fp8_training", "sdpa_rewrite", "log_rewrites",
                 "deterministic_backward", "speculate_mask_inputs", "min_train_attention_flops",
                 "gluon_forward", "gluon_backward")


@pytest.fixture(autouse=True)
def _fresh_state():
    saved = {n: getattr(fa3_inductor.config, n) for n in _CONFIG_NAMES}
    torch._dynamo.reset()
    _backend.REPORTS.clear()
    _triton_impl.clear_plans()     # remembered routes / plans: tests patch what they decide on
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
    _backend.REPORTS.clear()
    for n, v in saved.items():
        setattr(fa3_inductor.config, n, v)
