"""Recording under torch.distributed with 2 gloo processes on CPU: FSDP2 (every rank takes
part, the store holds the full matrices), DDP (rank 0 records), and failures that must raise on
every rank instead of hanging. The ranks' own code and assertions: tests/distributed_child.py."""

import socket

import pytest
import torch.multiprocessing as mp

import distributed_child

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


def _spawn(function, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(function, args=(2, port, *map(str, args)), nprocs=2, join=True)


def test_fsdp2_store_holds_the_full_matrices_bitwise(tmp_path):
    _spawn(distributed_child.fsdp2_bitwise, tmp_path / "r.zarr")


def test_ddp_rank0_records_the_unwrapped_model(tmp_path):
    _spawn(distributed_child.ddp_rank0_records, tmp_path / "r.zarr")


def test_sharded_failures_raise_on_every_rank_within_the_timeout(tmp_path):
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "not-a-store" / "notes.txt").write_text("keep")
    _spawn(distributed_child.sharded_failures_raise_on_every_rank, tmp_path)
    assert (tmp_path / "not-a-store" / "notes.txt").read_text() == "keep"
