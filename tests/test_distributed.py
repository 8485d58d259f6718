"""torch.compile(backend="fa3") under data-parallel training (DDP, FSDP2) on CPU/gloo, 2 ranks.

One `torch.distributed.run --nproc_per_node=2` launch of tests/distributed/train_worker.py trains
every case for 3 SGD steps; a single-process run of the same worker (same seeds, same global
batch) runs at the same time and is the reference.  Checked per case and rank:

- losses per step and final (gathered) parameters equal the single-process run (fp32 bar);
- every rank holds identical final parameters;
- every attention layer runs through fa3::attention_fwd / attention_bwd on every step, every
  softmax in every graph was rewritten (nothing unmatched or left alone);
- graphs: DDP with default buckets compiles one graph holding both sites (as single-process);
  DDP with small buckets (ddp_split) is split by DDPOptimizer into several graphs and the sites
  survive the split; FSDP2 compiles per FSDP unit (its hooks are not traced), and one block graph
  serves both blocks;
- no recompiles after the first step (and none at all for DDP and single-process).

The worker replaces Inductor's CPU code generation with AOTAutograd + eager (15-30 s per graph
otherwise); the fa3 backend itself (matcher, rewrite, custom op + autograd) is the real one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed", "train_worker.py")
TIMEOUT_S = 170

DIST_CASES = ["llama/ddp", "nanogpt/ddp", "nanogpt/ddp_split", "llama/fsdp2", "nanogpt/fsdp2"]
REF_OF = {"ddp": "single", "ddp_split": "single_split", "fsdp2": "single"}
SINGLE_CASES = sorted({f"{c.split('/')[0]}/{REF_OF[c.split('/')[1]]}" for c in DIST_CASES})

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="1", PYTHONUNBUFFERED="1")
    return env


def _load(path):
    with open(path) as f:
        res = json.load(f)
    res["params"] = torch.load(path + ".params.pt")
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("fa3_dist")
    dist_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_addr=127.0.0.1", f"--master_port={_free_port()}", WORKER,
                "--cases", ",".join(DIST_CASES), "--out", str(out / "rank{rank}.json")]
    single_cmd = [sys.executable, WORKER, "--cases", ",".join(SINGLE_CASES), "--out", str(out / "single.json")]
    t0 = time.time()
    logs = {name: open(out / f"{name}.log", "w") for name in ("dist", "single")}
    procs = {"dist": subprocess.Popen(dist_cmd, stdout=logs["dist"], stderr=subprocess.STDOUT, env=_env()),
             "single": subprocess.Popen(single_cmd, stdout=logs["single"], stderr=subprocess.STDOUT, env=_env())}
    rcs = {}
    try:
        for name, p in procs.items():
            rcs[name] = p.wait(timeout=max(1.0, TIMEOUT_S - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        pytest.fail(f"distributed run exceeded {TIMEOUT_S} s; logs in {out}")
    finally:
        for f in logs.values():
            f.close()

    def tail(name):
        return (out / f"{name}.log").read_text()[-6000:]
    results = {}
    for name, path in (("single", out / "single.json"), ("rank0", out / "rank0.json"),
                       ("rank1", out / "rank1.json")):
        if not path.exists():
            pytest.fail(f"{name}: no result (rc={rcs}); log:\n{tail('single' if name == 'single' else 'dist')}")
        results[name] = _load(str(path))
    results["seconds"] = time.time() - t0
    return results


def _case(runs, who, key):
    res = runs[who]
    assert key not in res["errors"], f"{who} {key} failed:\n{res['errors'][key]}"
    assert key in res["cases"], f"{who}: {key} did not run (errors: {list(res['errors'])})"
    return res["cases"][key], res["params"][key]


@pytest.mark.parametrize("key", DIST_CASES)
def test_matches_single_process(runs, key):
    name, mode = key.split("/")
    ref, ref_params = _case(runs, "single", f"{name}/{REF_OF[mode]}")
    for rank in ("rank0", "rank1"):
        got, params = _case(runs, rank, key)
        assert got["world"] == 2
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), **LOSS_TOL,
                                   msg=lambda m: f"{key} {rank}: loss curve differs from single-process: {m}")
        assert sorted(params) == sorted(ref_params)
        for pname in ref_params:
            torch.testing.assert_close(params[pname], ref_params[pname], **PARAM_TOL,
                                       msg=lambda m: f"{key} {rank}: final {pname} differs: {m}")
    p0, p1 = runs["rank0"]["params"][key], runs["rank1"]["params"][key]
    for pname in p0:
        assert torch.equal(p0[pname], p1[pname]), f"{key}: ranks disagree on {pname}"


def _check_rewrites(c, key, who):
    n = c["n_attention_layers"]
    assert not c["unmatched"], f"{who} {key}: softmax left unmatched: {c['unmatched']}"
    assert not c["not_rewritten"], f"{who} {key}: matched but not rewritten: {c['not_rewritten']}"
    # every attention layer ran through our op, forward and backward, on every step
    assert c["op_fwd_calls_per_step"] == [n] * c["steps"], (who, key, c["op_fwd_calls_per_step"])
    assert c["op_bwd_calls_per_step"] == [n] * c["steps"], (who, key, c["op_bwd_calls_per_step"])
    # graphs do not grow after the first step, nor do recompiles
    assert len(set(c["unique_graphs_after_step"])) == 1, (who, key, c["unique_graphs_after_step"])
    assert len(set(c["recompiles_after_step"])) == 1, (who, key, c["recompile_reasons"])


@pytest.mark.parametrize("key", DIST_CASES + SINGLE_CASES)
def test_attention_rewritten_and_no_recompiles(runs, key):
    name, mode = key.split("/")
    for who in (("single",) if mode.startswith("single") else ("rank0", "rank1")):
        c, _ = _case(runs, who, key)
        n = c["n_attention_layers"]
        assert n == 2
        _check_rewrites(c, key, who)
        per_graph = c["rewritten_per_graph"]
        if mode in ("single", "single_split", "ddp"):
            # one Dynamo graph, one backend call (DDPOptimizer keeps one bucket), both sites in it
            assert per_graph == [n], (who, key, per_graph)
            assert c["unique_graphs"] == 1 and c["recompiles"] == 0, (who, key, c["recompile_reasons"])
        elif mode == "ddp_split":
            # DDPOptimizer splits the one Dynamo graph at bucket boundaries: several backend calls,
            # each attention site whole inside one of them
            assert c["unique_graphs"] == 1 and c["recompiles"] == 0, (who, key, c["recompile_reasons"])
            assert len(per_graph) > 1, (who, key, per_graph)
            assert sum(per_graph) == n and max(per_graph) == 1, (who, key, per_graph)
        elif mode == "fsdp2":
            # FSDP2 hooks are not traced: Dynamo compiles per FSDP unit; both blocks share one
            # block graph with one site (the op-call count above shows both blocks run it)
            assert sum(per_graph) == 1, (who, key, per_graph)
            if name == "nanogpt":
                assert c["unique_graphs"] == 1 and c["recompiles"] == 0, (who, key, c["recompile_reasons"])
            else:
                # the HF model's frames pass through transformers' shared decorator wrapper
                # (utils/deprecation.py wrapped_func): recompiled on the first step, never after
                for r in c["recompile_reasons"]:
                    assert "deprecation.py" in r, (who, key, r)


def test_runtime_budget(runs):
    assert runs["seconds"] < TIMEOUT_S
