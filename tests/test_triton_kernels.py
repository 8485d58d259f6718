"""The Triton attention kernels on CPU, through Triton's interpreter.

TRITON_INTERPRET must be set before Triton is imported and stays process-wide, which would
turn every other Triton use in this pytest process (the sm_90 compile checks) into
interpreted functions.  So the cases (interp_triton_kernels.py) run in a child pytest with
the variable set; this test fails with the child's report if any case fails."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.mark.parametrize("selection", ["not slow", "slow"])
def test_triton_kernels_interpreted(selection):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", selection,
         os.path.join(HERE, "interp_triton_kernels.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton kernel cases failed:\n{tail}"
    assert " passed" in proc.stdout, tail
