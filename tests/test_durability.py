"""Recording processes killed with SIGKILL (while a reader reads), two writers on one store,
and a two-process torch.distributed run."""

import json
import os
import signal
import socket
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
from record_child import make_model, trajectory
from spectra.capture.recorder import Recorder
from spectra.store import StoreError, existing

HERE = Path(__file__).parent


READER = """
import json, os, sys, time
import numpy as np
import spectra
from spectra.store import StoreError
path, stop = sys.argv[1], sys.argv[2]
reads, errors, seen = 0, [], 0
while not os.path.exists(stop):
    try:
        run = spectra.open_run(path)
    except (FileNotFoundError, StoreError) as exc:  # not created yet (or a damaged store)
        if "no such run store" not in str(exc):
            errors.append(repr(exc))
        time.sleep(0.02)
        continue
    n = len(run)
    try:
        assert np.array_equal(run.steps, np.arange(n)), run.steps
        if n:
            for name in run.params:
                assert np.isfinite(run.weights(name, n - 1)).all()
    except Exception as exc:
        errors.append(repr(exc))
    reads, seen = reads + 1, max(seen, n)
print(json.dumps({"reads": reads, "errors": errors[:5], "max_seen": seen}))
"""


def _child(path, *args, env=None):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(HERE / "record_child.py"), str(path), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, line):
    got = proc.stdout.readline().strip()
    assert got == line, (got, proc.stderr.read())


def _wait_for_snapshots(path, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if len(spectra.open_run(path)) >= count:
                return
        except (FileNotFoundError, StoreError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} never reached {count} snapshots")


def _assert_trajectory(path, seed=0):
    """Every committed snapshot equals the independently recomputed weights, bitwise."""
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, np.arange(len(run)))
    truth = trajectory(len(run), seed)
    for t in range(len(run)):
        for name in run.params:
            np.testing.assert_array_equal(run.weights(name, t), truth[t][name],
                                          err_msg=f"{name} @ {t}")
    return len(run)


@pytest.mark.slow
def test_random_sigkills_with_a_concurrent_reader_lose_no_committed_snapshot(tmp_path):
    """Ten SIGKILLs at random moments (creating, opening, recording, closing), each run
    resuming the last; a reader process checks the store throughout."""
    path, stop = tmp_path / "killed.zarr", tmp_path / "stop"
    rng = np.random.default_rng(13)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills, found = 0, set()
    try:
        for round_ in range(10):
            done = len(spectra.open_run(path)) if existing(path) == "store" else 0
            proc = _child(path, "--steps", str(done + int(rng.integers(5, 80))))
            _wait_for(proc, "recording")
            time.sleep(rng.uniform(0, 0.3 if round_ < 3 else 1.5))  # creation takes ~0.2 s
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
            found.add(existing(path))
            assert existing(path) in ("absent", "store")  # never a half-made store
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    seen = json.loads(out)
    final = _assert_trajectory(path)
    print(f"kills {kills}, snapshots {final}, reader passes {seen['reads']}, "
          f"max seen {seen['max_seen']}, lost {max(0, seen['max_seen'] - final)}")
    assert not seen["errors"], seen["errors"]
    assert seen["max_seen"] <= final  # nothing the reader saw committed was lost
    assert kills >= 5 and final > 20


@pytest.mark.slow
def test_kills_during_store_creation_leave_no_half_made_store(tmp_path):
    outcomes = []
    for trial, delay in enumerate(np.linspace(0, 0.4, 6)):  # creation takes ~0.2 s
        path = tmp_path / f"c{trial}.zarr"
        proc = _child(path, "--steps", "3")
        _wait_for(proc, "recording")
        time.sleep(delay)
        proc.kill()
        proc.wait()
        outcomes.append(existing(path))
        assert outcomes[-1] in ("absent", "store"), outcomes
        with Recorder(make_model(), path, every=1, start_step=None if outcomes[-1] == "absent"
                      else len(spectra.open_run(path)) + 5):
            pass  # a restart always works
    print(f"kills during creation: {outcomes}")


@pytest.mark.slow
def test_two_writers_started_together_one_records_the_other_names_it(tmp_path):
    path, stop = tmp_path / "both.zarr", tmp_path / "stop"
    procs = {seed: _child(path, "--seed", str(seed), "--until", str(stop), "--pace", "0.05")
             for seed in (1, 2)}
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.1)  # until one of them gives up
    time.sleep(1.0)
    stop.touch()
    results = {seed: (proc, *proc.communicate(timeout=120)) for seed, proc in procs.items()}
    winners = [seed for seed, r in results.items() if r[0].returncode == 0]
    assert len(winners) == 1, [(r[0].returncode, r[2][-300:]) for r in results.values()]
    winner, loser = winners[0], 3 - winners[0]
    assert (f"writer lock is held by process {procs[winner].pid} on {socket.gethostname()}"
            in results[loser][2])
    assert _assert_trajectory(path, seed=winner) > 1


@pytest.mark.slow
def test_a_second_writer_fails_at_once_and_leaves_the_first_ones_data_untouched(tmp_path):
    path, stop = tmp_path / "staggered.zarr", tmp_path / "stop"
    first = _child(path, "--seed", "1", "--until", str(stop), "--pace", "0.05")
    _wait_for(first, "recording")
    _wait_for_snapshots(path, 5, first)
    second = _child(path, "--seed", "2", "--until", str(stop))
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0 and "StoreLocked" in err
    assert f"writer lock is held by process {first.pid}" in err
    assert first.poll() is None  # still recording
    stop.touch()
    assert first.wait(timeout=120) == 0
    assert _assert_trajectory(path, seed=1) > 5


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
