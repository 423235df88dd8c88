import io

import numpy as np
import pytest
import torch
from torch import nn

from spectra.methods import build_method
from spectra.methods.optim_state import StateMap, remap_state
from spectra.methods.inrank.controller import InRankController, grow_rank, select_linears, to_inrank
from spectra.methods.inrank.layers import InRankEfficientLinear, InRankLinear
from spectra.tasks.models import GPT, GPTConfig


def official_ratio(s, j):
    """The official code's explained ratio, written out in numpy: keep the top j values."""
    kept = s.copy()
    kept[j:] = 0
    return 1 - np.var(s - kept) / np.var(s)


def official_window(s, rank, buffer, alpha, max_rank):
    """The official window search (in_rank_efficient.py), extended to include r + b."""
    top = min(rank + buffer, max_rank - buffer)
    for j in range(rank, top + 1):
        if official_ratio(s, j) > alpha:
            return j
    return top


def adam_step(layer, optimizer, x, target):
    loss = (layer(x) - target).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def mlp():
    return nn.Sequential()


class Block(nn.Module):
    def __init__(self, width=12, hidden=20):
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        return self.mlp(torch.tanh(self.attn(x)))


# -- the rule ------------------------------------------------------------------------------------

def test_grow_rank_matches_an_independent_numpy_computation_of_the_explained_ratio():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(4, 40))
        s = np.sort(rng.gamma(0.5, size=n) * (rng.random(n) < 0.7))[::-1].copy()
        if s[0] == 0:
            continue
        rank, buffer = int(rng.integers(1, n // 2 + 1)), int(rng.integers(0, 6))
        alpha = float(rng.uniform(0.5, 0.99))
        expected = max(rank, min(official_window(s, rank, buffer, alpha, n), n))
        assert grow_rank(s, rank=rank, buffer=buffer, alpha=alpha, max_rank=n) == expected


def test_grow_rank_keeps_the_rank_for_buffer_zero_and_for_a_zero_product():
    s = np.array([3.0, 2.0, 1.0, 1.0, 0.0])
    assert grow_rank(s, rank=1, buffer=0, alpha=0.9, max_rank=5) == 1
    assert grow_rank(np.zeros(5), rank=1, buffer=2, alpha=0.9, max_rank=5) == 1
    # with buffer 1 it can still grow (the official window [r, r + b − 1] is empty there)
    assert grow_rank(s, rank=1, buffer=1, alpha=0.9, max_rank=5) == 2


def test_controller_decision_equals_numpy_svd_plus_numpy_ratio():
    torch.manual_seed(0)
    layer = InRankLinear(30, 20, rank=3, buffer=5)
    with torch.no_grad():
        layer.u.normal_()
        layer.u[:, :2] *= 6.0
    s = np.linalg.svd((layer.u @ layer.v.T).detach().double().numpy(), compute_uv=False)
    expected = official_window(s, 3, 5, 0.9, 20)
    controller = InRankController({"fc": layer}, alpha=0.9, every=1, warmup=0)
    assert controller.evaluate() == {"fc": expected}
    assert layer.active_rank == expected + 5


# -- the layers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [InRankLinear, InRankEfficientLinear])
def test_growing_the_rank_leaves_the_layer_function_unchanged(cls):
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    layer = cls.from_linear(linear, rank=2, buffer=3)
    with torch.no_grad():
        layer.u.normal_()
    x = torch.randn(50, 16)
    before = layer(x).detach()
    maps = layer.grow(6)
    assert (layer.rank, layer.active_rank) == (6, 9)
    assert layer.u.shape == (24, 9) and layer.v.shape == (16, 9)
    assert [m.fresh for m in maps] == [4, 4]  # 2 + 3 → 6 + 3 active columns
    torch.testing.assert_close(layer(x).detach(), before, rtol=0, atol=1e-6)
    v = layer.v.detach().double()  # new directions orthogonal to the old ones, same mean norm
    assert torch.allclose(v[:, :5].T @ v[:, 5:], torch.zeros(5, 4, dtype=torch.float64),
                          atol=1e-6)
    torch.testing.assert_close(v[:, 5:].norm(dim=0).mean(), v[:, :5].norm(dim=0).mean())


def test_growth_while_an_old_graph_is_alive_keeps_backward_working():
    layer = InRankLinear(6, 5, rank=1, buffer=1)
    optimizer = torch.optim.Adam(layer.parameters())
    loss = layer(torch.randn(3, 6)).pow(2).sum()  # its graph stays referenced below
    loss.backward()
    optimizer.step()
    layer.grow(3)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    assert layer.u.grad.shape == (5, 4) and loss.requires_grad


def test_vanilla_layer_starts_as_the_linear_and_exposes_w0_plus_uvT():
    torch.manual_seed(0)
    linear = nn.Linear(8, 5)
    layer = InRankLinear.from_linear(linear, rank=1, buffer=2)
    x = torch.randn(7, 8)
    torch.testing.assert_close(layer(x), linear(x))
    with torch.no_grad():
        layer.u.normal_()
    weight = layer.weight
    assert not isinstance(weight, nn.Parameter) and weight.shape == (5, 8)
    torch.testing.assert_close(weight, linear.weight + layer.u @ layer.v.T)
    assert "rank=1, buffer=2, active=3/5" in repr(layer)


def test_efficient_layer_starts_from_the_best_rank_k_part_of_the_linear():
    torch.manual_seed(0)
    linear = nn.Linear(12, 9)
    layer = InRankEfficientLinear.from_linear(linear, rank=2, buffer=1)
    u, s, vh = np.linalg.svd(linear.weight.detach().double().numpy())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), best, atol=1e-6)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + linear.bias)


def test_truncate_keeps_the_best_rank_r_approximation_and_drops_the_buffer():
    torch.manual_seed(0)
    layer = InRankEfficientLinear(20, 14, rank=3, buffer=4)
    with torch.no_grad():
        layer.u.normal_()
    product = layer.weight.detach().double().numpy()
    u, s, vh = np.linalg.svd(product)
    layer.truncate(layer.rank)
    assert (layer.rank, layer.buffer, layer.active_rank) == (3, 0, 3)
    np.testing.assert_allclose(layer.weight.detach().double().numpy(),
                               (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
    norms_u, norms_v = layer.u.detach().norm(dim=0), layer.v.detach().norm(dim=0)
    torch.testing.assert_close(norms_u, norms_v, rtol=1e-4, atol=0)  # balanced: U S^½, V S^½


def test_state_dict_round_trip_restores_ranks_and_outputs():
    torch.manual_seed(0)
    model = Block()
    controller = to_inrank(model, rank=1, buffer=2)
    for layer in controller.layers.values():
        with torch.no_grad():
            layer.u.normal_()
        layer.grow(4)
    x = torch.randn(6, 12)
    expected = model(x).detach()
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    saved.seek(0)

    torch.manual_seed(1)
    fresh = Block()
    to_inrank(fresh, rank=1, buffer=2)
    fresh.load_state_dict(torch.load(saved, weights_only=False))
    for name in ("mlp.0", "mlp.2"):
        layer = fresh.get_submodule(name)
        assert (layer.rank, layer.buffer, layer.active_rank) == (4, 2, 6)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


# -- the controller ------------------------------------------------------------------------------

def test_teacher_of_rank_5_grows_the_rank_to_5_and_stops():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    n_in, n_out = 24, 20
    q_out = torch.linalg.qr(torch.randn(n_out, 5, generator=generator)).Q
    q_in = torch.linalg.qr(torch.randn(n_in, 5, generator=generator)).Q
    linear = nn.Linear(n_in, n_out, bias=False)
    teacher = linear.weight.detach() + 2.0 * q_out @ q_in.T  # W_0 + a rank-5 update
    model = nn.Sequential(linear)
    controller = to_inrank(model, layers="0", rank=1, buffer=2, every=10, warmup=20)
    optimizer = controller.adamw(lr=2e-2, weight_decay=0.0)
    x = torch.randn(256, n_in, generator=generator)
    ranks = []
    for step in range(1, 401):
        loss = adam_step(model, optimizer, x, x @ teacher.T)
        ranks.append(controller(step)["rank.0"])
    steps_up = np.diff([1.0] + ranks)
    assert ranks[0] == 1 and steps_up.min() >= 0 and steps_up.max() <= 2  # by at most the buffer
    assert len(set(ranks[:60])) >= 3  # it grew incrementally (1 → 3 → 4 here) ...
    assert ranks[-1] == 5 and ranks[200:] == [5.0] * 200  # ... to the teacher's rank, and stopped
    assert loss < 1e-4 * (teacher - linear.weight).pow(2).sum().item()


def test_evaluation_forwards_do_not_advance_the_schedule():
    torch.manual_seed(0)
    layer = InRankLinear(10, 10, rank=1, buffer=2)
    with torch.no_grad():
        layer.u.copy_(torch.eye(10)[:, :3])  # a flat product: the rule would grow
    controller = InRankController({"fc": layer}, alpha=0.9, every=5, warmup=0)
    layer.eval()
    with torch.no_grad():
        for _ in range(100):
            layer(torch.randn(3, 10))
    assert layer.rank == 1
    for step in range(1, 5):
        controller(step)
    assert layer.rank == 1
    controller(5)
    assert layer.rank == 3


def test_buffer_zero_trains_at_a_fixed_rank():
    torch.manual_seed(0)
    model = Block()
    controller = to_inrank(model, rank=3, buffer=0, every=1, warmup=0)
    optimizer = controller.adamw(lr=1e-2, weight_decay=0.0)
    x = torch.randn(32, 12)
    for step in range(1, 21):
        adam_step(model, optimizer, x, torch.zeros(32, 12))
        scalars = controller(step)
    assert all(layer.active_rank == 3 for layer in controller.layers.values())
    assert scalars["rank.mlp.0"] == 3 and scalars["rank_fraction"] == pytest.approx(6 / 24)


def test_growth_keeps_the_adam_state_of_the_old_columns_exactly():
    torch.manual_seed(0)
    x, target = torch.randn(40, 16), torch.randn(40, 24)
    layers = [InRankLinear.from_linear(nn.Linear(16, 24), rank=2, buffer=2,
                                       generator=torch.Generator().manual_seed(0))
              for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=1e-2) for layer in layers]
    for _ in range(5):
        for layer, optimizer in zip(layers, optimizers):
            adam_step(layer, optimizer, x, target)
    state_before = {k: v.clone() for k, v in optimizers[1].state[layers[1].u].items()}
    remap_state(optimizers[1], layers[1].grow(5), fresh="row-mean")  # 4 → 7 active columns
    state = optimizers[1].state[layers[1].u]
    torch.testing.assert_close(state["exp_avg"][:, :4], state_before["exp_avg"])
    assert state["exp_avg"][:, 4:].abs().max() == 0
    torch.testing.assert_close(state["exp_avg_sq"][:, 4:],
                               state_before["exp_avg_sq"].mean(1, keepdim=True).expand(-1, 3))
    for layer, optimizer in zip(layers, optimizers):
        adam_step(layer, optimizer, x, target)
    # the old columns took exactly the step they would have taken without the growth
    torch.testing.assert_close(layers[1].u[:, :4], layers[0].u, rtol=0, atol=1e-7)
    torch.testing.assert_close(layers[1].v[:, :4], layers[0].v, rtol=0, atol=1e-7)


def test_truncation_rotates_the_first_moment_instead_of_slicing_it():
    torch.manual_seed(0)
    layer = InRankEfficientLinear(10, 8, rank=2, buffer=3)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.0)  # moments move, weights do not
    g = torch.randn(8, 10)
    (layer.weight * g).sum().backward()  # ∂L/∂W = g
    optimizer.step()
    old_u_moment = optimizer.state[layer.u]["exp_avg"].clone()
    remap_state(optimizer, layer.truncate(layer.rank))
    beta1 = 0.9
    # the first moment is (1 − β1)·gradient, in the new coordinates: g V' and gᵀ U'
    torch.testing.assert_close(optimizer.state[layer.u]["exp_avg"],
                               (1 - beta1) * g @ layer.v.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(optimizer.state[layer.v]["exp_avg"],
                               (1 - beta1) * g.T @ layer.u.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(optimizer.state[layer.u]["exp_avg"], old_u_moment[:, :2],
                              atol=1e-3)  # what the official code keeps
    assert optimizer.state[layer.u]["exp_avg_sq"].shape == (8, 2)


def test_truncation_of_factors_already_in_svd_form_slices_the_second_moment_exactly():
    layer = InRankEfficientLinear(6, 5, rank=2, buffer=1)
    with torch.no_grad():
        layer.u.copy_(torch.eye(5)[:, :3] * torch.tensor([3.0, 2.0, 1.0]).sqrt())
        layer.v.copy_(torch.eye(6)[:, :3] * torch.tensor([3.0, 2.0, 1.0]).sqrt())
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.0)
    (layer.weight * torch.randn(5, 6)).sum().backward()
    optimizer.step()
    before = optimizer.state[layer.u]["exp_avg_sq"].clone()
    remap_state(optimizer, layer.truncate(layer.rank))
    torch.testing.assert_close(optimizer.state[layer.u]["exp_avg_sq"], before[:, :2])


def test_unknown_optimizer_state_is_an_error_not_a_guess():
    p = nn.Parameter(torch.zeros(3, 2))
    optimizer = torch.optim.Adam([p])
    optimizer.state[p] = {"mystery": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="mystery"):
        remap_state(optimizer, [StateMap(p, right=torch.eye(2))])


# -- conversion and methods ------------------------------------------------------------------------

def test_default_conversion_takes_the_mlp_linears_of_the_gpt():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    controller = to_inrank(model)
    assert list(controller.layers) == ["blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj",
                                       "blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"]
    assert isinstance(model.blocks[0].attn.c_attn, nn.Linear)
    logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 11)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"buffer": -1}, "buffer"), ({"rank": -2}, "rank"), ({"every": 0}, "every"),
    ({"variant": "lora"}, "variant"), ({"layers": "attn.*"}, "matches no nn.Linear"),
    ({"layers": "mlp.1"}, r"'mlp.1' \(GELU\)"),
])
def test_bad_arguments_are_clear_errors_and_leave_the_model_alone(kwargs, message):
    model = Block()
    with pytest.raises(ValueError, match=message):
        to_inrank(model, **kwargs)
    assert all(type(m) is not InRankLinear for m in model.modules())


@pytest.mark.parametrize("options, message", [
    ({"bufer": 4}, r"unknown InRank option\(s\) \['bufer'\]"),
    ({"preset": "paper"}, "preset='paper'"), ({"window": "wide"}, "window='wide'"),
    ({"count": "epochs"}, "count='epochs'"), ({"max_rank": "third"}, "max_rank='third'"),
    ({"buffer": "many"}, "buffer='many'"), ({"moments": "reset"}, "moments='reset'"),
])
def test_bad_method_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        build_method("inrank", Block(), lr=1e-3, weight_decay=0.0, total_steps=10,
                     layers="mlp.*", **options)


def test_select_linears_lists_the_available_layers_in_its_error():
    with pytest.raises(ValueError, match=r"\['attn', 'mlp.0', 'mlp.2'\]"):
        select_linears(Block(), "nothing")


@pytest.mark.parametrize("method, options", [
    ("inrank", {"rank": 1, "buffer": 2, "every": 2, "warmup": 2}),
    ("inrank-efficient", {"rank": 1, "buffer": 2, "every": 2, "warmup": 2, "search_steps": 6}),
    ("fixed-rank", {"rank": 3, "lr_scale": 2.0}),
])
def test_methods_train_and_report_ranks(method, options):
    torch.manual_seed(0)
    model = Block()
    built = build_method(method, model, lr=1e-2, weight_decay=0.1, total_steps=10,
                         layers="mlp.*", **options)
    x = torch.randn(32, 12)
    for step in range(1, 11):
        adam_step(model, built.optimizer, x, torch.sin(x))
        scalars = built.after_step(step)
    assert set(scalars) == {"rank.mlp.0", "rank.mlp.2", "rank_fraction", "trainable_params"}
    assert scalars["trainable_params"] == sum(p.numel() for p in model.parameters())
    factor_group = built.optimizer.param_groups[-1]
    assert factor_group["lr_scale"] == options.get("lr_scale", 4.0)  # ours: the factors at 4×
    if method == "inrank-efficient":
        assert all(m.buffer == 0 for m in model.modules() if isinstance(m, InRankEfficientLinear))


def test_increment_rule_reads_the_change_since_the_previous_evaluation():
    torch.manual_seed(0)
    layer = InRankLinear(30, 20, rank=2, buffer=6)
    controller = InRankController({"fc": layer}, every=1, warmup=0, rule_input="increment")
    with torch.no_grad():
        layer.u[:, :2].normal_()
        layer.u[:, :2] *= 10.0  # old, large directions
    controller.evaluate()
    assert layer.rank == 2
    first = (layer.u @ layer.v.T).detach().double().numpy()
    with torch.no_grad():
        layer.u[:, 2:8].normal_()  # what changed since: six new directions of similar size
    change = (layer.u @ layer.v.T).detach().double().numpy() - first
    s = np.linalg.svd(change, compute_uv=False)
    expected = official_window(s, 2, 6, 0.9, 20)
    assert expected > 2
    assert controller.evaluate() == {"fc": expected}  # the cumulative product would keep 2
    cumulative = np.linalg.svd(change + first, compute_uv=False)
    assert official_window(cumulative, 2, 6, 0.9, 20) < expected


@pytest.mark.slow
@pytest.mark.parametrize("method", ["inrank", "inrank-efficient"])
def test_spectra_train_records_an_inrank_run_with_its_ranks(tmp_path, capsys, method):
    from spectra.cli import main
    from spectra.store import open_run
    options = ["layers=layers.0,layers.1", "warmup=5", "every=5", "rank=2", "buffer=4"]
    args = ["train", "--method", method, "--task", "mlp", "--epochs", "1", "--quiet",
            "--out", str(tmp_path)]
    assert main(args + [a for option in options for a in ("-O", option)]) == 0
    assert f"{method}: test accuracy" in capsys.readouterr().out
    run = open_run(tmp_path / f"mlp-{method}-s0.zarr")
    assert [run.spec(name).kind for name in run.params] == ["effective", "effective", "linear"]
    rank = int(run.scalars["rank.layers.0"][-1])
    # what the store holds has exactly the rank the layer reported
    matrix = run.weights("layers.0.weight", -1) if method == "inrank-efficient" else \
        run.updates("layers.0.weight", -1)
    s = np.linalg.svd(matrix, compute_uv=False)
    numerical = int((s > 1e-5 * s[0]).sum())
    assert rank > 2  # it grew
    if method == "inrank":
        assert numerical <= rank + 4  # the update U Vᵀ has r + b columns
    else:
        assert numerical == rank  # stage 2: W = U Vᵀ truncated to rank r
