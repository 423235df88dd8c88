"""Which matrices the Recorder picks and how it reads them."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conftest import TinyNet
from spectra.capture.selection import select_matrices


def _names(model, **kw):
    return [m.spec.name for m in select_matrices(model, **kw)]


def test_default_selection_skips_embeddings_and_1d_params():
    picked = {m.spec.name: m.spec for m in select_matrices(TinyNet())}
    assert list(picked) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert picked["conv.weight"].shape == (3, 2 * 3 * 3)
    assert picked["conv.weight"].original_shape == (3, 2, 3, 3)
    assert picked["conv.weight"].kind == "conv" and picked["fc1.weight"].kind == "linear"


def test_conv_kernel_is_read_as_out_by_in_times_kernel():
    model = TinyNet()
    conv = {m.spec.name: m for m in select_matrices(model)}["conv.weight"]
    expected = torch.stack([model.conv.weight[o].flatten() for o in range(3)])
    torch.testing.assert_close(conv.read(), expected, rtol=0, atol=0)


def test_embeddings_on_request_and_by_include_pattern():
    assert _names(TinyNet(), embeddings=True)[0] == "emb.weight"
    assert _names(TinyNet(), include=["emb.*", "fc2.*"]) == ["emb.weight", "fc2.weight"]


def test_exclude_and_unmatched_include_and_empty_model():
    assert _names(TinyNet(), exclude="fc*") == ["conv.weight"]
    with pytest.raises(ValueError, match=r"include patterns \['fc3\.\*'\] match no matrix"):
        select_matrices(TinyNet(), include=["fc1.*", "fc3.*"])
    with pytest.raises(ValueError, match="LayerNorm has no weight matrices to record"):
        select_matrices(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no weight matrices"):
        select_matrices(TinyNet(), exclude="*")


def test_tied_weights_are_recorded_once_under_their_first_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4, bias=False)
            self.out = nn.Linear(4, 4, bias=False)
            self.out.weight = self.inp.weight

    assert _names(Tied()) == ["inp.weight"]


class LowRank(nn.Module):
    """A layer whose `weight` is a computed dense matrix, like the InRank/OIALR layers."""

    def __init__(self, m, n, r):
        super().__init__()
        self.u = nn.Parameter(torch.randn(m, r))
        self.v = nn.Parameter(torch.randn(n, r))

    @property
    def weight(self):
        return self.u @ self.v.T


def test_effective_weight_is_recorded_instead_of_factors():
    model = nn.Sequential(nn.Linear(5, 6), LowRank(7, 6, 2), nn.Linear(7, 3))
    picked = {m.spec.name: m for m in select_matrices(model)}
    assert list(picked) == ["0.weight", "1.weight", "2.weight"]
    assert picked["1.weight"].spec.kind == "effective" and picked["1.weight"].spec.shape == (7, 6)
    torch.testing.assert_close(picked["1.weight"].read(), model[1].u @ model[1].v.T)


def test_parametrized_linear_is_recorded_through_its_weight():
    class Sym(nn.Module):
        def forward(self, x):
            return x.triu() + x.triu(1).T

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parametrize.register_parametrization(model[0], "weight", Sym())
    picked = {m.spec.name: m for m in select_matrices(model)}
    assert list(picked) == ["0.weight", "1.weight"]
    torch.testing.assert_close(picked["0.weight"].read(), model[0].weight)


def test_raw_matrix_parameters_are_recorded():
    mha = nn.MultiheadAttention(8, 2)
    picked = {m.spec.name: m.spec.kind for m in select_matrices(mha)}
    assert picked == {"in_proj_weight": "matrix", "out_proj.weight": "linear"}


def test_a_layer_converted_in_place_keeps_being_read():
    """OIALR-style: a Linear's weight Parameter is replaced by a computed U Σ Vᵀ mid-run."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 2))
    reader = {m.spec.name: m.read for m in select_matrices(model)}["0.weight"]
    layer = model[0]
    u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    del layer.weight
    layer.register_buffer("u", u)
    layer.register_buffer("vh", vh)
    layer.sigma = nn.Parameter(torch.diag(s) * 2)
    layer.__class__ = type("Factored", (nn.Linear,),
                           {"weight": property(lambda self: self.u @ self.sigma @ self.vh)})
    torch.testing.assert_close(reader(), 2 * (u * s) @ vh)
