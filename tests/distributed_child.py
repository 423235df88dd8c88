"""What each rank runs in the distributed tests (2 gloo processes on CPU, spawned by
tests/test_distributed.py). Assertions run inside the ranks; a failing rank fails the test."""

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import spectra
from spectra.capture.recorder import Recorder
from spectra.store import RunWriter


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


class Mixed(nn.Module):
    """Layers whose shards are rows of different things: a conv kernel, a ConvTranspose kernel
    (rows = inputs), transformers' Conv1D (rows = inputs) and an uneven Linear (7 rows / 2)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 3, padding=1)
        self.proj = Conv1D(nf=10, nx=3 * 5 * 5)
        self.head = nn.Linear(10, 7)

    def forward(self, x):
        h = torch.tanh(self.up(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(self.proj(h.flatten(1))))


def fsdp2_bitwise(rank, world, port, path):
    """FSDP2: every stored W_t equals the full state dict gathered by torch at that step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, port)
    torch.manual_seed(0)
    model = Mixed()
    for layer in (model.conv, model.up, model.proj, model.head):
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(model.head.weight, torch.distributed.tensor.DTensor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    full = StateDictOptions(full_state_dict=True)
    states = {0: get_model_state_dict(model, options=full)}
    optimizer.register_step_post_hook(
        lambda *_: states.setdefault(len(states), get_model_state_dict(model, options=full)))
    generator = torch.Generator().manual_seed(rank)
    with Recorder(model, path, every=2, timeout=60) as rec:
        assert rec.sharded
        for _ in range(5):
            loss = model(torch.randn(4, 2, 5, 5, generator=generator)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss.item())
        assert rec.snapshot() is True  # the final weights, on every rank
    dist.barrier()
    if rank == 0:
        run = spectra.open_run(path)
        np.testing.assert_array_equal(run.steps, [0, 2, 4, 5])
        assert run.params == ["conv.weight", "up.weight", "proj.weight", "head.weight"]
        orient = {"conv.weight": lambda w: w.reshape(4, -1),
                  "up.weight": lambda w: w.transpose(0, 1).reshape(3, -1),
                  "proj.weight": lambda w: w.T, "head.weight": lambda w: w}
        for t, step in enumerate(run.steps):
            for name, matrix in orient.items():
                want = matrix(states[int(step)][name]).numpy()
                np.testing.assert_array_equal(run.weights(name, t), want)
        assert np.isfinite(run.scalars["loss"][1:3]).all()
        frame = spectra.analyze(path, quiet=True, k=3)  # k: the smallest side (3 rows of up.weight)
        assert set(frame["param"].unique()) == set(run.params)
    dist.destroy_process_group()


def ddp_rank0_records(rank, world, port, path):
    """DDP: rank 0 records the unwrapped model; the other rank's Recorder does nothing."""
    _init(rank, world, port)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(),
                                                              nn.Linear(8, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    copies = {0: [p.detach().clone() for p in model.parameters()]}
    optimizer.register_step_post_hook(
        lambda *_: copies.setdefault(len(copies), [p.detach().clone() for p in model.parameters()]))
    generator = torch.Generator().manual_seed(rank)
    with Recorder(model, path, every=1) as rec:
        assert rec.active == (rank == 0) and not rec.sharded
        for _ in range(3):
            loss = model(torch.randn(4, 6, generator=generator)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert rec.step() == (rank == 0)
    dist.barrier()
    if rank == 0:
        run = spectra.open_run(path)
        assert run.params == ["0.weight", "2.weight"]
        for t in range(4):
            np.testing.assert_array_equal(run.weights("0.weight", t), copies[t][0].numpy())
            np.testing.assert_array_equal(run.weights("2.weight", t), copies[t][2].numpy())
        frame = spectra.analyze(path, quiet=True, k=2)  # k: the smallest side (2-output head)
        assert set(frame["param"].unique()) == set(run.params)
    dist.destroy_process_group()


def _sharded_linear():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def _train(model, rec, steps, generator, on_step=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(1, steps + 1):
        loss = model(torch.randn(3, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(k)
        rec.step()


def sharded_failures_raise_on_every_rank(rank, world, port, folder):
    """A failing rank makes the others raise, never hang: the writer cannot open its store; the
    writer fails while writing; a rank stops taking part."""
    _init(rank, world, port)
    folder = Path(folder)
    model = _sharded_linear()
    generator = torch.Generator().manual_seed(rank)

    # 1. rank 0 cannot open the store (the path is a folder of something else)
    started = time.monotonic()
    try:
        Recorder(model, folder / "not-a-store", timeout=20).start()
        raise AssertionError("start() should have failed")
    except Exception as exc:
        expected = "not a spectra run store" if rank == 0 else "could not open"
        assert expected in str(exc), exc
    assert time.monotonic() - started < 15

    # 2. rank 0's writer fails at step 3: every rank raises at that snapshot
    original = RunWriter.write  # what the Recorder's writer thread calls per snapshot

    def full_disk(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(28, "No space left on device")
        return original(self, step, *args, **kwargs)

    RunWriter.write = full_disk
    rec = Recorder(model, folder / "full.zarr", every=1, timeout=20).start()
    try:
        _train(model, rec, 40, generator)
        raise AssertionError("training should have stopped")
    except RuntimeError as exc:
        assert "No space left on device" in str(exc), exc
    finally:
        rec.close(raise_errors=False)
        RunWriter.write = original
    dist.barrier()
    if rank == 0:
        assert list(spectra.open_run(folder / "full.zarr").steps) == [0, 1, 2]

    # 3. rank 1 stops stepping its Recorder after step 2: rank 0 raises within the timeout
    # (no training here: only the recording's own collectives run)
    rec = Recorder(model, folder / "stop.zarr", every=1, timeout=3).start()
    if rank == 1:
        rec.step()
        rec.step()
        time.sleep(15)  # alive, but no longer recording
        rec.close(raise_errors=False)
        return
    started = time.monotonic()
    try:
        for _ in range(3):
            rec.step()
            started = time.monotonic()
        raise AssertionError("rank 0 should have given up")
    except RuntimeError as exc:
        waited = time.monotonic() - started
        assert "not every rank took part within 3 s" in str(exc), exc
        assert waited < 12, waited  # the 3 s timeout, not rank 1 exiting after 15 s
    finally:
        rec.close(raise_errors=False)
    assert list(spectra.open_run(folder / "stop.zarr").steps) == [0, 1, 2]
