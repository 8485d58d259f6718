"""The child-process runner of the GPU prototype scripts (gluon_fwd_proto.py, gluon_bwd_proto.py).

Each (head dim, causal) instantiation runs in a child process, so that a compile error, a wrong
result or a hang (an mbarrier deadlock never returns) costs one line and the run goes on.  The
child prints its results as `RESULT <json>` lines; everything else it prints is echoed.
"""
from __future__ import annotations

import json
import subprocess


def run(cmd: list, timeout: float):
    """(results, stdout, stderr, rc) of one child; rc is "timeout" when it was killed."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "", "timeout"
    results = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
    return results, out, err, rc


def report_end(D: int, causal: bool, results: list, out: str, err: str, rc, timeout: float) -> None:
    """The child's fate (timeout / failure) and its non-RESULT output, one line each."""
    if rc == "timeout":
        print(f"D={D} causal={int(causal)}: TIMEOUT after {timeout:.0f}s "
              f"({'no result: probable hang' if not results else 'partial results above'})")
    elif rc not in (0, 3):
        tail = (err.strip().splitlines() or ["?"])[-1]
        print(f"D={D} causal={int(causal)}: FAILED rc={rc}: {tail[:200]}")
    for ln in out.splitlines():
        if not ln.startswith("RESULT ") and ln.strip():
            print(f"  [D={D} c={int(causal)}] {ln[:200]}")


# ---- the child's side ----------------------------------------------------------------------
def emit(**kw) -> None:
    """One result for the parent."""
    print("RESULT " + json.dumps(kw), flush=True)


def guarded_first_call(fn, what: str, timeout_s: float = 20.0) -> None:
    """Launch once and poll a CUDA event without blocking: an mbarrier deadlock is an event that
    never completes.  Then report and hard-exit (the parent's timeout is the backstop, in case
    process exit itself hangs on the stuck context)."""
    import os
    import time

    import torch
    fn()
    ev = torch.cuda.Event()
    ev.record()
    t0 = time.time()
    while not ev.query():
        if time.time() - t0 > timeout_s:
            emit(kind="hang", what=what, seconds=timeout_s)
            os._exit(3)
        time.sleep(0.005)
