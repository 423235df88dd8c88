"""The runnable examples under examples/, each at its tiny size (what CI runs)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spectra

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("lightning")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *launcher, str(EXAMPLES / script), "--tiny", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_hf_trainer_example_with_ddp_under_torchrun(tmp_path):
    out = _run("hf_trainer.py", "--out", str(tmp_path / "r.zarr"), cwd=tmp_path,
               launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2"))
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 1, 2, 3, 4, 5, 6])
    assert run.attrs["config"]["world_size"] == 2
    assert run.params[-1] == "lm_head.weight"
    assert run.shape("transformer.h.0.mlp.c_fc.weight") == (128, 32)  # Conv1D stored (out, in)
    assert "transformer.h.1.mlp.c_proj.weight" in out  # the printed effective ranks


def test_lightning_example_with_ddp_on_two_processes(tmp_path):
    _run("lightning_callback.py", "--out", str(tmp_path / "r.zarr"), "--devices", "2",
         cwd=tmp_path)
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 5, 8])
    assert run.attrs["config"]["world_size"] == 2
    assert run.params == ["net.0.weight", "net.2.weight", "net.5.weight", "net.7.weight"]


def test_fsdp2_example(tmp_path):
    out = _run("fsdp2.py", "--out", str(tmp_path / "r.zarr"), cwd=tmp_path)
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 4, 8])
    assert run.shape("blocks.0.mlp.c_fc.weight") == (128, 32)  # the full matrix, not a shard
    assert "Run(" in out


def test_lora_example(tmp_path):
    out = _run("lora.py", "--out", str(tmp_path / "r.zarr"), "--rank", "4", cwd=tmp_path)
    run = spectra.open_run(tmp_path / "r.zarr")
    assert run.params == [f"transformer.h.{i}.{p}.weight" for i in range(2)
                          for p in ("attn.c_attn", "mlp.c_fc")]
    assert int(run.steps[-1]) == 6 and "numerical rank of ΔW" in out
    for name in run.params:  # ΔW_t = s·B·A: rank at most r
        assert 0 < np.linalg.matrix_rank(run.updates(name, -1), tol=1e-7) <= 4
