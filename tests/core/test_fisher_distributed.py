"""A real 2-process gloo run of the estimators equals the single-process result on every rank."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import fisher_dist_worker as worker

WORKER = os.path.join(os.path.dirname(__file__), "fisher_dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both ranks (launched like torchrun: RANK / WORLD_SIZE / MASTER_* in the environment)."""
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp / f"rank{r}.pt")], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed Fisher workers timed out (a hung all_reduce?)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single():
    model, batches = worker.data()
    return worker.compute(model, batches, 0, 1)


def close(a, b):
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * float(b.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["token", "example", "presharded", "empty_shard", "max_batches"])
def test_two_ranks_equal_one_process(ranks, single, key):
    for rank in ranks:
        assert set(rank[key]) == set(single[key]) and len(single[key]) == 3
        for name, F in single[key].items():
            close(rank[key][name], F)
    assert all(torch.equal(ranks[0][key][n], ranks[1][key][n]) for n in single[key])  # identical on every rank


@pytest.mark.slow
def test_two_ranks_kfac_equal_one_process(ranks, single):
    for rank in ranks:
        for name, (X, G, count) in single["kfac"].items():
            rX, rG, rcount = rank["kfac"][name]
            close(rX, X)
            close(rG, G)
            assert rcount == count == 81  # non-padding tokens of the five batches
