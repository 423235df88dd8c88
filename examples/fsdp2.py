"""Record an FSDP2 run: the demo character GPT sharded with ``fully_shard`` over 2 CPU processes
(gloo); every rank takes part in each snapshot and the store holds the full matrices.

    python examples/fsdp2.py [--out runs/fsdp2-gpt.zarr] [--steps 300] [--tiny]
    torchrun --nproc_per_node 2 examples/fsdp2.py      # the same, launched by torchrun

Needs ``pip install "spectra-dynamics[demo]"`` (the KJV text). Run as a script it starts its own
two processes; under torchrun it uses the ones it is given. With --tiny: a 2-layer model for a
few steps on Python's help text (what CI runs).
"""

import argparse
import os
import shutil
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import spectra
from spectra.tasks.data import CharCorpus, kjv_text, pydoc_text
from spectra.tasks.models import GPT, GPTConfig


def train(args: argparse.Namespace) -> None:
    """One rank's training loop (every rank runs the same code)."""
    rank = dist.get_rank()
    corpus = CharCorpus(pydoc_text() if args.tiny else kjv_text())
    config = (GPTConfig(corpus.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
              if args.tiny else GPTConfig(corpus.vocab_size))
    torch.manual_seed(0)  # the same initial model on every rank
    model = GPT(config)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)  # the embeddings and the head: sharded by the root
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(rank)  # each rank its own batches
    steps = 8 if args.tiny else args.steps
    # every rank creates, starts and steps the Recorder; rank 0 writes the store
    with spectra.Recorder(model, args.out, every=4, timeout=300) as rec:
        for _ in range(steps):
            x, y = corpus.batch("train", 16, config.block_size, generator)
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss.item())  # rank 0's loss is stored
        rec.snapshot()
    if rank == 0:
        run = spectra.open_run(args.out)
        print(run)
        print({name: run.shape(name) for name in run.params[:4]}, "...")


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fsdp2-gpt.zarr")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="a few steps of a 2-layer model")
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        if dist.get_rank() == 0:
            shutil.rmtree(args.out, ignore_errors=True)
        dist.barrier()
        try:
            train(args)
        finally:
            dist.destroy_process_group()
        return
    shutil.rmtree(args.out, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
