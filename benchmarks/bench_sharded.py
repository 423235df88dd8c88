"""Recording an FSDP2 model: gathering to the writer rank (what the Recorder does) against every
rank writing its own rows of the zarr arrays (a prototype of the alternative), in one run.

    python benchmarks/bench_sharded.py [--layers 6] [--width 768] [--steps 8] [--rounds 3]

Two gloo processes on CPU train a stack of ``layers`` Linear(width, width) layers sharded with
``fully_shard``, recording every step and every 4th step. Settings are interleaved round by
round in rotating order (no recording, design A, design B), so that load from other processes
hits all of them alike; each reports medians over rounds:

- step: seconds per training step including recording (the writer thread's work included, since
  the run ends with close(): everything committed);
- stall: seconds the training thread spends inside the recording call at a snapshot step;
- the ratio of step times to no recording.

Design A (spectra.capture.sharded): each rank copies its shards to the host, rank 0 gathers them
over gloo, assembles the full matrices and queues them for its single writer thread.
Design B (the prototype below): each rank copies its shards and its own writer thread writes its
rows of ΔW_t into updates arrays chunked along the shard boundaries (zarr writes distinct chunks
safely in parallel); rank 0 appends ``steps`` once every rank reports its rows landed. Same
codec (lz4 + bitshuffle), float64 updates, max_pending=2 in both.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zarr
from torch import nn

from spectra.capture.recorder import Recorder
from spectra.store import MATRIX_COMPRESSORS


def build(layers: int, width: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


class RowWriter:
    """Design B: this rank writes its own rows of every matrix; rank 0 commits each step."""

    def __init__(self, model: nn.Module, path: Path, snapshots: int, max_pending: int = 2):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.path, self.snapshots = path, snapshots
        self.params = [(name, p) for name, p in model.named_parameters()]
        if self.rank == 0:
            root = zarr.open_group(path, mode="w")
            for name, p in self.params:
                m, n = p.shape
                rows = -(-m // self.world)
                group = root.create_group(name)
                group.create_array("init", shape=(m, n), chunks=(rows, n), dtype="float32",
                                   compressors=MATRIX_COMPRESSORS)
                group.create_array("updates", shape=(snapshots, m, n), chunks=(1, rows, n),
                                   dtype="float64", fill_value=np.nan,
                                   compressors=MATRIX_COMPRESSORS)
            root.create_array("steps", shape=(0,), chunks=(1024,), dtype="int64", fill_value=-1)
        dist.barrier()
        self.root = zarr.open_group(path, mode="r+")
        self.rows = {name: self._rows(p) for name, p in self.params}
        self.init = {name: p.to_local().detach().cpu().float().numpy().copy()
                     for name, p in self.params}
        for name, (r0, r1) in self.rows.items():
            self.root[f"{name}/init"][r0:r1] = self.init[name]
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.row = 0

    def _rows(self, p) -> tuple[int, int]:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return offset[0], offset[0] + shape[0]

    def snapshot(self, step: int) -> None:
        local = {name: p.to_local().detach().to("cpu", torch.float32, copy=True)
                 for name, p in self.params}
        self.queue.put((self.row, step, local))
        self.row += 1

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            row, step, local = item
            for name, (r0, r1) in self.rows.items():
                update = np.subtract(local[name].numpy(), self.init[name], dtype=np.float64)
                self.root[f"{name}/updates"][row, r0:r1] = update
            _atomic_write(self.path / f"landed-{self.rank}", str(row))
            if self.rank == 0:
                self._commit(row, step)

    def _commit(self, row: int, step: int) -> None:
        while any(_landed(self.path, r) < row for r in range(self.world)):
            time.sleep(0.002)
        steps = self.root["steps"]
        steps.resize((row + 1,))
        steps[row] = step


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _landed(path: Path, rank: int) -> int:
    try:
        return int((path / f"landed-{rank}").read_text())
    except (FileNotFoundError, ValueError):
        return -1


def run_setting(design: str, model: nn.Module, steps: int, every: int, width: int,
                folder: Path, generator: torch.Generator) -> tuple[float, float]:
    """(seconds per step until everything is committed, median stall at a snapshot step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    path = folder / f"{design}-{every}-{time.monotonic_ns()}.zarr"
    path = Path(_same_on_all_ranks(str(path)))
    stalls = []
    dist.barrier()
    start = time.perf_counter()
    if design == "A":
        recorder = Recorder(model, path, every=every, timeout=600).start()
    elif design == "B":
        recorder = RowWriter(model, path, steps // every + 1)
        recorder.snapshot(0)
    for step in range(1, steps + 1):
        loss = model(torch.randn(32, width, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        began = time.perf_counter()
        if design == "A":
            recorder.step()
        elif design == "B" and step % every == 0:
            recorder.snapshot(step)
        if design != "none" and step % every == 0:
            stalls.append(time.perf_counter() - began)
    if design != "none":
        recorder.close()
    dist.barrier()
    elapsed = time.perf_counter() - start
    return elapsed / steps, statistics.median(stalls) if stalls else 0.0


def _same_on_all_ranks(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(args.layers, args.width)
    generator = torch.Generator().manual_seed(rank)
    folder = Path(tempfile.mkdtemp(prefix="bench-sharded-")) if rank == 0 else Path()
    results: dict[str, list] = {}
    settings = [("none", 1), ("A", 1), ("B", 1), ("A", 4), ("B", 4)]
    for round_ in range(args.rounds):
        shift = round_ % len(settings)
        for design, every in settings[shift:] + settings[:shift]:
            step, stall = run_setting(design, model, args.steps, every, args.width, folder,
                                      generator)
            results.setdefault(f"{design}/{every}", []).append((step, stall))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
        shutil.rmtree(folder)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(worker, args=(2, port, args, out), nprocs=2, join=True)
    results = json.loads(Path(out).read_text())
    mb = args.layers * args.width**2 * 4 / 2**20
    print(f"FSDP2, 2 gloo ranks, {args.layers} x Linear({args.width}, {args.width}): "
          f"{mb:.1f} MB of float32 weights per snapshot; medians of {args.rounds} rounds of "
          f"{args.steps} steps")
    base = statistics.median(s for s, _ in results["none/1"])
    print(f"{'setting':<12} {'s/step':>8} {'vs none':>8} {'stall/snapshot':>15}")
    for key, rows in results.items():
        step = statistics.median(s for s, _ in rows)
        stall = statistics.median(t for _, t in rows)
        design, every = key.split("/")
        name = "none" if design == "none" else f"{design} every={every}"
        print(f"{name:<12} {step:8.3f} {step / base:8.2f}x {stall:14.3f}s")


if __name__ == "__main__":
    main()
