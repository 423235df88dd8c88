"""spectra and WeightWatcher (benchmarks/bench_weightwatcher.py's peer) see the same spectrum."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

import spectra
from spectra.analysis.analyzer import singular_values

weightwatcher = pytest.importorskip("weightwatcher")


def test_weightwatcher_esd_is_the_square_of_spectras_singular_values(tmp_path):
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((64, 48)))
    v, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    model = nn.Sequential(nn.Linear(48, 64, bias=False))
    with torch.no_grad():  # σ_i from 1 down to 1e-2: every value, not only the top, compared
        model[0].weight.copy_(torch.from_numpy(u * np.geomspace(1, 1e-2, 48) @ v.T))
    path = tmp_path / "run.zarr"
    with spectra.Recorder(model, path):
        pass
    spectra.analyze(path, targets="weights", k=0, quiet=True)
    _, sv = singular_values(path, "0.weight", target="weights", k=0)

    evals = weightwatcher.WeightWatcher(model=model).get_ESD(layer=1)

    np.testing.assert_allclose(np.sqrt(np.sort(evals)[::-1]), sv[0], rtol=1e-4)
