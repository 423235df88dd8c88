"""A recording process killed with SIGKILL, and a two-process torch.distributed run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spectra
from record_child import make_model, trajectory_step
from spectra.capture.recorder import Recorder
from spectra.store import StoreError

HERE = Path(__file__).parent


def _wait_for_snapshots(path, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if len(spectra.open_run(path)) >= count:
                return
        except (FileNotFoundError, StoreError, KeyError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} never reached {count} snapshots")


@pytest.mark.slow
@pytest.mark.parametrize("extra_delay", [0.0, 0.137])
def test_sigkilled_recorder_leaves_committed_snapshots_intact_and_resumable(tmp_path, extra_delay):
    path = tmp_path / "killed.zarr"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(HERE / "record_child.py"), str(path)],
                            env=env, stderr=subprocess.PIPE)
    try:
        _wait_for_snapshots(path, 20, proc)
        time.sleep(extra_delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    run = spectra.open_run(path)
    n = len(run)
    assert n >= 20
    np.testing.assert_array_equal(run.steps, np.arange(n))

    # recompute the deterministic trajectory independently and compare every committed snapshot
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for k in range(n):
        if k:
            trajectory_step(model, opt, k)
        for name, p in model.named_parameters():
            if p.ndim == 2:
                np.testing.assert_array_equal(run.weights(name, k), p.detach().numpy(), err_msg=f"{name} @ {k}")

    # resume: the model is at the last committed step, so no start_step is needed
    with Recorder(model, path, every=1) as rec:
        assert rec.global_step == n - 1
        for k in range(n, n + 3):
            rec.step(loss=trajectory_step(model, opt, k))
    resumed = spectra.open_run(path)
    np.testing.assert_array_equal(resumed.steps, np.arange(n + 3))
    np.testing.assert_array_equal(resumed.weights("2.weight", -1), model[2].weight.detach().numpy())


def _ddp_worker(rank, world, init_file, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, store_path, every=2) as rec:
        taken = []
        for k in range(1, 7):
            g = torch.Generator().manual_seed(100 * rank + k)  # different data per rank
            x = torch.randn(8, 6, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            taken.append(rec.step(loss=loss.item()))
    np.save(Path(out_dir) / f"rank{rank}.npy", model.module.weight.detach().numpy())
    np.save(Path(out_dir) / f"taken{rank}.npy", np.array(taken + [rec.active]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_run_only_rank_0_writes(tmp_path):
    store = tmp_path / "ddp.zarr"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(store), str(tmp_path)), nprocs=2)
    run = spectra.open_run(store)
    assert run.params == ["weight"]  # DDP's "module." prefix is unwrapped
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    final0, final1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(final0, final1)  # DDP kept the replicas equal
    np.testing.assert_array_equal(run.weights("weight", -1), final0)
    taken0, taken1 = np.load(tmp_path / "taken0.npy"), np.load(tmp_path / "taken1.npy")
    assert taken0.tolist() == [False, True, False, True, False, True, True]
    assert taken1.tolist() == [False] * 6 + [False]  # rank 1: inactive, never snapshots
    assert "resumes" not in run.attrs
