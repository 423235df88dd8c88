import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import spectra
from spectra.methods import build_method
from spectra.methods.oialr.controller import (
    OIALR,
    FixedDelay,
    convert_layers,
    cut_rank,
    oialr_candidates,
)
from spectra.methods.oialr.layers import SVDConv2d, SVDLinear, to_svd_layer
from spectra.methods.oialr.trigger import StabilityTrigger
from spectra.core.metrics import oialr_stability


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(*sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def orthonormality_error(a):
    return (a.T.double() @ a.double() - torch.eye(a.shape[1], dtype=torch.float64)).abs().max()


def train(model, optimizer, after_step, steps, x, y, loss=F.mse_loss):
    for step in range(1, steps + 1):
        value = loss(model(x), y)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        after_step(step)


# -- layers ------------------------------------------------------------------------------------

def test_conversion_leaves_linear_outputs_unchanged_and_exposes_the_dense_weight():
    torch.manual_seed(0)
    dense = nn.Linear(24, 40)
    x = torch.randn(16, 24)
    layer = to_svd_layer(dense)
    assert isinstance(layer, SVDLinear) and layer.rank == 24
    assert layer.bias is dense.bias
    torch.testing.assert_close(layer(x), dense(x), atol=2e-6, rtol=1e-5)
    assert not isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight, dense.weight, atol=1e-6, rtol=1e-5)
    assert orthonormality_error(layer.u) < 1e-6 and orthonormality_error(layer.v) < 1e-6
    assert [name for name, _ in layer.named_parameters()] == ["sigma", "bias"]
    assert "in_features=24, out_features=40, rank=24" in repr(layer)


def test_factored_and_dense_forward_agree_after_a_cut():
    torch.manual_seed(0)
    layer = to_svd_layer(nn.Linear(64, 48))
    layer.truncate(5)  # 5·(48+64+5) < 48·64: the factored path
    x = torch.randn(7, 64)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_conversion_leaves_conv_outputs_unchanged():
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 9)
    layer = to_svd_layer(dense)
    assert isinstance(layer, SVDConv2d) and layer.rank == 6  # matrix (6, 2·3·3)
    torch.testing.assert_close(layer(x), dense(x), atol=2e-6, rtol=1e-5)
    assert layer.weight.shape == dense.weight.shape
    assert "rank=6" in repr(layer) and "kernel_size=(3, 3)" in repr(layer)


def test_rotation_leaves_outputs_unchanged_and_diagonalises_sigma():
    torch.manual_seed(0)
    layer = to_svd_layer(nn.Linear(30, 20))
    with torch.no_grad():
        layer.sigma.add_(0.3 * torch.randn(20, 20))  # a trained, non-diagonal Σ
    x = torch.randn(8, 30)
    before, weight = layer(x), layer.weight.detach().clone()
    p, q = layer.rotate()
    torch.testing.assert_close(layer(x), before, atol=2e-6, rtol=1e-5)
    sigma = layer.sigma.detach()
    s = torch.diagonal(sigma)
    assert (sigma - torch.diag(s)).abs().max() == 0 and bool((s[:-1] >= s[1:]).all())
    # the diagonal is the spectrum of W (an independent SVD)
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(weight.double().numpy(), compute_uv=False),
                               rtol=1e-5, atol=1e-6)
    assert orthonormality_error(p) < 1e-12 and orthonormality_error(q) < 1e-12


def test_after_a_cut_u_and_v_stay_orthonormal_and_w_is_its_best_rank_k_part():
    torch.manual_seed(0)
    layer = to_svd_layer(nn.Linear(30, 20))
    with torch.no_grad():
        layer.sigma.add_(0.3 * torch.randn(20, 20))
    weight = layer.weight.detach().double().numpy()
    layer.rotate()
    layer.truncate(6)
    assert layer.u.shape == (20, 6) and layer.v.shape == (30, 6) and layer.sigma.shape == (6, 6)
    assert orthonormality_error(layer.u) < 1e-5 and orthonormality_error(layer.v) < 1e-5
    u, s, vh = np.linalg.svd(weight)
    best = (u[:, :6] * s[:6]) @ vh[:6]  # Eckart–Young
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), best, atol=1e-5)


def test_cut_rank_rule():
    s = torch.tensor([10.0, 5.0, 3.0, 1.9, 1.0, 0.5, 0.1, 0.05])
    assert cut_rank(s, 8, beta=0.2, min_rank=1) == 4      # σ ≥ 2: 4 of them, = ⌊8/2⌋
    assert cut_rank(s, 8, beta=0.5, min_rank=1) == 4      # 2 pass, but at most half cut
    assert cut_rank(s, 8, beta=0.005, min_rank=1) == 8    # all pass: no cut
    assert cut_rank(s, 8, beta=0.5, min_rank=6) == 6      # never below the minimum rank
    assert cut_rank(s[:3], 3, beta=0.9, min_rank=1) == 1  # ⌊3/2⌋ = 1


# -- the controller ----------------------------------------------------------------------------

def test_candidates_follow_eligibility_and_first_last_rules():
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 5),  # 5 < 64/10
                          nn.Linear(5, 60), nn.Linear(32, 32), nn.Embedding(10, 32),
                          nn.LayerNorm(32), nn.Linear(32, 16))
    assert oialr_candidates(model) == ["0", "1", "4"]  # keep_last: the model's last Linear
    assert oialr_candidates(model, keep_first=True) == ["1", "4"]
    assert oialr_candidates(model, keep_first=False, keep_last=False) == ["0", "1", "4", "7"]
    # the official code keeps the first / last *eligible* layer instead
    assert oialr_candidates(model, keep_first=True, keep_among="eligible") == ["1", "4"]
    assert oialr_candidates(model, keep_among="eligible") == ["0", "1", "4"]


def test_conversion_in_the_controller_is_in_place_and_keeps_the_function():
    model = mlp(10, 32, 32, 3)
    x = torch.randn(20, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = OIALR(model, optimizer, FixedDelay(3), frequency=100, keep_first=False)
    outputs = {}

    def after_step(step):
        outputs[step, "before"] = model(x).detach()
        controller(step)
        outputs[step, "after"] = model(x).detach()

    train(model, optimizer, after_step, 3, x, torch.randn(20, 3))
    assert isinstance(model[0], SVDLinear) and isinstance(model[2], SVDLinear)
    assert type(model[4]) is nn.Linear
    torch.testing.assert_close(outputs[3, "after"], outputs[3, "before"], atol=1e-5, rtol=1e-5)
    assert {id(p) for p in model.parameters()} == {id(p) for g in optimizer.param_groups
                                                   for p in g["params"]}


def test_rank_is_cut_to_that_of_a_rank_4_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    u, _ = torch.linalg.qr(torch.randn(32, 4))
    v, _ = torch.linalg.qr(torch.randn(32, 4))
    target = u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ v.T
    x = torch.randn(256, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    controller = OIALR(model, optimizer, FixedDelay(300), beta=0.1, frequency=50,
                       keep_first=False, keep_last=False)
    ranks = {}
    train(model, optimizer, lambda step: ranks.update({step: controller(step)["rank.0"]}),
          600, x, x @ target.T)
    assert ranks[300] == 32 and ranks[350] == 16 and ranks[400] == 8  # at most half per cut
    assert ranks[600] == 4
    torch.testing.assert_close(model[0].weight.detach(), target, atol=2e-2, rtol=0)


def test_biases_of_converted_layers_keep_training():
    model = mlp(10, 32, 32, 3)
    x, y = torch.randn(20, 10), torch.randn(20, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = OIALR(model, optimizer, FixedDelay(2), frequency=100, keep_first=False)
    biases = {}

    def after_step(step):
        controller(step)
        biases[step] = model[2].bias.detach().clone()

    train(model, optimizer, after_step, 6, x, y)
    assert isinstance(model[2], SVDLinear)
    assert (biases[6] - biases[2]).abs().min() > 0


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.SGD(params, lr=0.0, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.0),
])
def test_first_moments_are_carried_exactly_through_conversion_and_cut(make):
    """With lr = 0 the function never changes until the cut, so the first moment of Σ must be
    the running mean of the gradients Σ would have received all along: U_rᵀ G_i V_r."""
    model = mlp(12, 16, 3)
    torch.manual_seed(1)
    batches = [(torch.randn(8, 12), torch.randn(8, 3)) for _ in range(6)]
    optimizer = make(model.parameters())
    controller = OIALR(model, optimizer, FixedDelay(3), frequency=3, beta=0.9,
                       keep_first=False, keep_last=False)
    dense = nn.Linear(12, 16)
    dense.load_state_dict(model[0].state_dict())
    gradients = []
    for step, (x, y) in enumerate(batches, start=1):
        reference = F.mse_loss(model[2](torch.relu(dense(x))), y)
        gradients.append(torch.autograd.grad(reference, dense.weight)[0].double())
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller(step)
    layer = model[0]
    assert layer.rank == 6  # cut at step 6: at most half of min(16, 12)
    u, v = layer.u.double(), layer.v.double()
    state = optimizer.state[layer.sigma]
    if "momentum_buffer" in state:
        expected = sum(0.9 ** (6 - i) * u.T @ g @ v for i, g in enumerate(gradients, start=1))
        carried = state["momentum_buffer"]
    else:
        expected = sum(0.1 * 0.9 ** (6 - i) * u.T @ g @ v for i, g in enumerate(gradients, start=1))
        carried = state["exp_avg"]
        assert float(state["step"]) == 6
        assert bool((state["exp_avg_sq"] >= 0).all())
    torch.testing.assert_close(carried.double(), expected, atol=1e-6, rtol=1e-4)


def test_second_moments_keep_their_total_through_a_square_rotation():
    model = mlp(16, 16, 16, seed=2)  # model[0] is square: rotations are orthogonal
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    controller = OIALR(model, optimizer, FixedDelay(2), frequency=1000, keep_first=False,
                       keep_last=True)
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    totals = {}

    def after_step(step):
        if step == 2:
            totals["dense"] = float(optimizer.state[model[0].weight]["exp_avg_sq"].sum())
        controller(step)
        if step == 2:
            totals["sigma"] = float(optimizer.state[model[0].sigma]["exp_avg_sq"].sum())

    train(model, optimizer, after_step, 2, x, y)
    assert totals["sigma"] == pytest.approx(totals["dense"], rel=1e-5)


def test_optimizer_state_shapes_match_parameters_after_each_cut():
    model = mlp(20, 48, 40, 5)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    controller = OIALR(model, optimizer, FixedDelay(5), frequency=3, beta=0.9,
                       keep_first=False)
    ranks = []

    def after_step(step):
        ranks.append(controller(step)["rank.2"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert optimizer.state[p][key].shape == p.shape

    train(model, optimizer, after_step, 20, x, y, loss=F.cross_entropy)
    assert [ranks[i] for i in (4, 7, 10, 13, 16, 19)] == [40, 20, 10, 5, 2, 1]  # halving
    params = {id(p) for p in model.parameters()}
    assert params == {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert len(optimizer.state) == len(params)  # no state left behind for dropped Σ's


def test_reset_moments_drops_the_state_at_conversion():
    model = mlp(10, 32, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    controller = OIALR(model, optimizer, FixedDelay(2), keep_first=False, moments="reset")
    train(model, optimizer, controller, 2, torch.randn(8, 10), torch.randn(8, 3))
    assert model[0].sigma not in optimizer.state and model[0].bias in optimizer.state


def test_state_dict_round_trip_restores_ranks_and_outputs():
    model = mlp(20, 48, 40, 5)
    x = torch.randn(16, 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = OIALR(model, optimizer, FixedDelay(3), frequency=3, beta=0.5, keep_first=False)
    train(model, optimizer, controller, 9, x, torch.randint(0, 5, (16,)), loss=F.cross_entropy)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = mlp(20, 48, 40, 5, seed=7)
    convert_layers(fresh, ["0", "2"])  # full rank until the checkpoint sets the ranks
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert fresh[0].rank == model[0].rank < 20 and fresh[2].rank == model[2].rank < 40
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_recorder_keeps_recording_a_layer_through_its_conversion(tmp_path):
    model = mlp(10, 24, 24, 3)
    x, y = torch.randn(16, 10), torch.randn(16, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = OIALR(model, optimizer, FixedDelay(4), frequency=2, beta=0.9, keep_first=False)
    weights = {}
    with spectra.Recorder(model, tmp_path / "run.zarr") as rec:
        def after_step(step):
            scalars = controller(step)
            weights[step] = model[2].weight.detach().clone()
            rec.step(**scalars)

        train(model, optimizer, after_step, 8, x, y)
    run = spectra.open_run(tmp_path / "run.zarr")
    assert list(run.steps) == list(range(9)) and "2.weight" in run.params
    for step in (2, 4, 6, 8):
        np.testing.assert_allclose(run.weights("2.weight", step), weights[step].numpy(), atol=1e-6)
    assert list(run.scalars["rank.2"][[3, 4, 5, 6]]) == [24, 24, 24, 12]


# -- the stability trigger ---------------------------------------------------------------------

def test_stability_trigger_fires_once_a_layer_stops_moving():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30))
    trigger = StabilityTrigger(every=2, k=4, ratio=1e-3, window=2)
    trigger.watch(model, ["0"])
    history = {}
    for step in range(0, 21):
        with torch.no_grad():
            scale = 1.0 if step < 10 else 1e-5  # big random steps, then tiny ones
            model[0].weight.add_(scale * torch.randn(30, 40))
        scalars = trigger(step)
        if trigger.ready:
            history["fired"] = step
            break
        history[step] = scalars.get("stability.0")
    # checks at 10, 12 compare a moved weight with a settled one; 12 and 14 pass: fires at 14
    assert history["fired"] == 14 and trigger.ready == ["0"]
    assert history[8] < 0.9 and history[12] > 1 - 1e-3
    assert scalars == {} and trigger.watched == []  # no longer watched once converted


def test_stability_trigger_is_scale_free_a_slower_layer_converts_at_the_same_point():
    """Two layers on the same schedule of motion, one 50× slower: each is read against its own
    peak, so both convert at the same check (an absolute bound would separate them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 40))
    trigger = StabilityTrigger(every=2, k=4, ratio=1e-2, window=2)
    trigger.watch(model, ["0", "1"])
    fired, early = {}, {}
    for step in range(0, 41):
        with torch.no_grad():
            phase = 1.0 if step < 20 else 1e-3
            model[0].weight.add_(phase * 0.5 * torch.randn(30, 40))
            model[1].weight.add_(phase * 0.01 * torch.randn(40, 30))
        scalars = trigger(step)
        if step == 10:
            early = {p: 1 - scalars[f"stability.{p}"] for p in ("0", "1")}
        fired.update({path: step for path in trigger.ready})
    assert early["1"] < 0.2 * early["0"]  # the slow layer moves far less in absolute terms
    assert fired == {"0": 24, "1": 24}  # checks 22 and 24 are the first two of the slow phase


def test_stability_trigger_measures_spectras_top_k_stability():
    torch.manual_seed(0)
    a, b = torch.randn(30, 40), torch.randn(30, 40)
    model = nn.Sequential(nn.Linear(40, 30))
    trigger = StabilityTrigger(every=1, k=5)
    trigger.watch(model, ["0"])
    for step, w in enumerate((a, a + 0.1 * b)):
        with torch.no_grad():
            model[0].weight.copy_(w)
        scalars = trigger(step)
    ua, _, vha = np.linalg.svd(a.double().numpy())
    ub, _, vhb = np.linalg.svd((a + 0.1 * b).float().double().numpy())
    expected = oialr_stability(ua[:, :5], vha[:5], ub[:, :5], vhb[:5])
    assert scalars["stability.0"] == pytest.approx(float(expected), abs=1e-5)


def test_stability_method_converts_layers_without_a_delay():
    model = mlp(10, 32, 32, 3)
    x, y = torch.randn(64, 10), torch.randn(64, 3)
    method = build_method("oialr-stability", model, lr=1e-2, weight_decay=0.0, total_steps=300,
                          check_every=10, ratio=1e-2, window=2)
    converted, reported = {}, set()

    def after_step(step):
        scalars = method.after_step(step)
        reported.update(name for name in scalars if name.startswith("stability."))
        for name in ("0", "2"):
            if isinstance(model.get_submodule(name), SVDLinear):
                converted.setdefault(name, step)
                assert f"stability.{name}" not in scalars

    train(method.model, method.optimizer, after_step, 300, x, y)
    assert reported == {"stability.0", "stability.2"}
    assert set(converted) == {"0", "2"}
    assert all(step % 10 == 0 and step >= 20 for step in converted.values()), converted


# -- arguments ---------------------------------------------------------------------------------

def test_bad_arguments_give_clear_errors():
    model = mlp(10, 32, 32, 3)
    optimizer = torch.optim.Adam(model.parameters())
    cases = [
        (dict(beta=0.0), "beta=0.0"), (dict(beta=1.0), "beta=1.0"),
        (dict(frequency=0), "frequency=0"), (dict(min_rank_fraction=2.0), "min_rank_fraction"),
        (dict(moments="slice"), "accepted: ('transform', 'official', 'reset')"),
        (dict(keep_first="no"), "keep_first='no'; must be True or False"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            OIALR(model, optimizer, FixedDelay(1), **kwargs)
    with pytest.raises(ValueError, match="delay=-1"):
        FixedDelay(-1)
    with pytest.raises(ValueError, match="no layer OIALR can factorise"):
        OIALR(nn.Sequential(nn.Linear(100, 5)), optimizer, FixedDelay(1))
    with pytest.raises(ValueError, match="keep_among='first'"):
        OIALR(model, optimizer, FixedDelay(1), keep_among="first")
    with pytest.raises(ValueError, match="count='epochs'"):
        OIALR(model, optimizer, FixedDelay(1), count="epochs")
    with pytest.raises(ValueError, match="preset='paper'"):
        build_method("oialr", mlp(10, 32, 32, 3), lr=1e-3, weight_decay=0.0, total_steps=30,
                     preset="paper")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bta'\]; accepted: .*'beta'"):
        build_method("oialr", mlp(10, 32, 32, 3), lr=1e-3, weight_decay=0.0, total_steps=30,
                     bta=0.2)
    with pytest.raises(ValueError, match="ratio=1.5"):
        StabilityTrigger(10, ratio=1.5)
    with pytest.raises(ValueError, match="window=0"):
        StabilityTrigger(10, window=0)
    with pytest.raises(TypeError, match="accepted: nn.Linear, nn.Conv2d"):
        to_svd_layer(nn.Embedding(5, 5))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        to_svd_layer(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"rank=0; must be in \[1, 10\]"):
        to_svd_layer(nn.Linear(10, 12)).truncate(0)
    with pytest.raises(ValueError, match="does not train the parameter being replaced"):
        frozen = mlp(10, 32, 32, 3)
        OIALR(frozen, torch.optim.Adam(frozen[4].parameters()), FixedDelay(0), keep_first=False)


@pytest.mark.slow
def test_spectra_train_runs_oialr_with_options(tmp_path, capsys):
    from spectra.cli import main
    assert main(["train", "--method", "oialr", "--task", "mlp", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path), "-O", "delay=20", "-O", "frequency=20",
                 "-O", "keep_first=false", "-O", "beta=0.5"]) == 0
    out = capsys.readouterr().out
    run = spectra.open_run(tmp_path / "mlp-oialr-s0.zarr")
    assert run.scalars["converted_at.layers.0"][-1] == 20
    assert run.scalars["rank.layers.1"][-1] <= 128  # cuts at 40 and 60: at least halved twice
    assert "trainable_percent" in out
    assert main(["train", "--method", "oialr-stability", "--task", "mlp", "--epochs", "1",
                 "--quiet", "--out", str(tmp_path), "-O", "dela=3"]) == 2
    assert "unknown option(s) ['dela']" in capsys.readouterr().err
