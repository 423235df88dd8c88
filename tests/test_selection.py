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


def test_frozen_parameters_are_skipped_unless_asked():
    model = TinyNet()
    model.fc1.requires_grad_(False)
    assert _names(model) == ["conv.weight", "fc2.weight"]
    assert _names(model, trainable_only=False) == ["conv.weight", "fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match=r"\['fc1\.\*'\] name only frozen parameters .*trainable_only=False"):
        select_matrices(model, include="fc1.*")


def test_conv_transpose_is_read_as_out_by_in_times_kernel_per_group():
    """Row o of the stored matrix holds the weights into output channel o (independent loops)."""
    torch.manual_seed(0)
    for groups in (1, 2):
        layer = nn.ConvTranspose2d(4, 6, kernel_size=(2, 3), groups=groups)
        (picked,) = select_matrices(nn.Sequential(layer))
        w = layer.weight.detach()  # (in, out/groups, kh, kw)
        in_per, out_per = 4 // groups, 6 // groups
        expected = torch.zeros(6, in_per * 6)
        for o in range(6):
            g, j = divmod(o, out_per)
            for i in range(in_per):
                expected[o, i * 6:(i + 1) * 6] = w[g * in_per + i, j].flatten()
        assert picked.spec.shape == (6, in_per * 6) and picked.spec.kind == "conv"
        torch.testing.assert_close(picked.read(), expected, rtol=0, atol=0)


def test_conv_transpose_matrix_maps_inputs_to_outputs():
    """On a 1×1 input, ConvTranspose output channel o at kernel offset p is Σ_i M[o, (i, p)]·x_i."""
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(3, 5, kernel_size=2, bias=False)
    (picked,) = select_matrices(nn.Sequential(layer))
    x = torch.randn(3)
    out = layer(x.view(1, 3, 1, 1)).detach()[0]  # (5, 2, 2)
    matrix = picked.read().view(5, 3, 4)
    torch.testing.assert_close(torch.einsum("oip,i->op", matrix, x), out.reshape(5, 4))


def test_compiled_models_are_recorded_under_plain_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1] = torch.compile(model[1])
    assert _names(torch.compile(model)) == ["0.weight", "1.weight"]


def test_leading_singleton_parameters_only_when_named():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
            self.pos = nn.Parameter(torch.randn(1, 6, 4))
            self.head = nn.Linear(4, 1)  # a one-output linear map stays a matrix

    model = Tokens()
    assert _names(model) == ["head.weight"]
    picked = {m.spec.name: m for m in select_matrices(model, include=["cls_token", "pos"])}
    assert picked["pos"].spec.shape == (6, 4) and picked["cls_token"].spec.shape == (1, 4)
    torch.testing.assert_close(picked["pos"].read(), model.pos[0].detach(), rtol=0, atol=0)


def test_tied_output_head_is_recorded_once_as_the_head():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.wte.weight

    picked = select_matrices(LM(), embeddings=True)
    assert [m.spec.name for m in picked] == ["body.weight", "head.weight"]
    head = picked[1].spec
    assert head.kind == "linear" and head.attrs["tied_to"] == ["wte.weight"]


def test_parameter_dtype_is_kept():
    model = nn.Sequential(nn.Linear(4, 3).to(torch.bfloat16), nn.Linear(3, 2).double())
    assert [m.spec.dtype for m in select_matrices(model)] == ["bfloat16", "float64"]


def test_parameter_layers_tell_how_each_state_dict_tensor_is_oriented():
    from spectra.capture.selection import parameter_layers
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.ConvTranspose1d(4, 4, 3, groups=2), nn.Embedding(5, 4))
    assert parameter_layers(model) == {"0.weight": ("linear", 1), "1.weight": ("conv_transpose", 2),
                                       "2.weight": ("embedding", 1)}
