"""The ``preset="official"`` methods behave as the official InRank and OIALR code does.

Each reference here is written from the official code's behaviour (github jiaweizzhao/InRank,
``src/models/layers/in_rank_efficient.py`` and ``src/tasks/seq.py``; github
Helmholtz-AI-Energy/OIALR, ``src/madonna/models/oialr/model.py``, ``linearusvh.py`` and
``src/madonna/models/utils.py``), independently of spectra's own formulas.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spectra.methods import build_method
from spectra.methods.inrank.layers import InRankEfficientLinear
from spectra.methods.inrank.rule import grow_rank
from spectra.methods.oialr.layers import SVDLinear
from spectra.tasks.models import GPT, MLP, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# -- OIALR: which layers -------------------------------------------------------------------------

def official_oialr_layers(model, keep_first=False, keep_last=True):
    """OIALRModel._replace_layers then _reset_last_layer: a pre-order walk converting every
    nn.Linear with min(shape) > max(shape)/10, the first such one skipped when keep_first, and
    the last one it converted put back when keep_last."""
    converted, first = [], keep_first

    def walk(module, name):
        nonlocal first
        if isinstance(module, nn.Linear) and min(module.weight.shape) > max(module.weight.shape) / 10:
            if not first:
                converted.append(name)
            else:
                first = False
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return converted[:-1] if keep_last and converted else converted


def converted_by(method, model, **options):
    built = build_method(method, model, lr=1e-3, weight_decay=0.0, total_steps=30, delay=0,
                         **options)
    return sorted(path for path, m in built.model.named_modules() if isinstance(m, SVDLinear))


def test_official_oialr_keeps_the_last_eligible_layer_of_the_mlp_dense():
    expected = official_oialr_layers(MLP((784, 512, 512, 10)))
    assert expected == ["layers.0"]  # layers.2 (10 × 512) is not eligible, so layers.1 is last
    assert converted_by("oialr", MLP((784, 512, 512, 10)), preset="official") == expected
    # ours keeps the model's last Linear, the ineligible head: both hidden layers convert
    assert converted_by("oialr", MLP((784, 512, 512, 10))) == ["layers.0", "layers.1"]


def test_official_oialr_converts_every_block_linear_of_the_gpt_and_keeps_the_head():
    config = GPTConfig(vocab_size=73, n_layer=2)
    expected = sorted(official_oialr_layers(GPT(config)))
    assert len(expected) == 8 and all(p.startswith("blocks.") for p in expected)
    assert converted_by("oialr", GPT(config), preset="official") == expected
    # with keep_first the official code skips the first *eligible* layer
    expected_first = sorted(official_oialr_layers(GPT(config), keep_first=True))
    assert converted_by("oialr", GPT(config), preset="official", keep_first=True) == \
        expected_first
    assert set(expected) - set(expected_first) == {"blocks.0.attn.c_attn"}


# -- OIALR: when, and the optimizer --------------------------------------------------------------

def mlp_run(steps, *, evaluations=(), **options):
    """A 6-layer MLP trained with the official preset; returns the method and, per training
    forward (1-based), whether layer 0 was converted when that forward ran and its rank."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(24, 24), nn.ReLU()) for _ in range(6)],
                          nn.Linear(24, 4))
    built = build_method("oialr", model, lr=1e-2, weight_decay=0.1, total_steps=steps,
                         preset="official", **options)
    seen = []
    probe = built.model[0][0]

    def record(module, args):
        layer = built.model[0][0]
        seen.append((isinstance(layer, SVDLinear), getattr(layer, "rank", 24)))

    built.model.register_forward_pre_hook(record)  # registered after the controller's clock
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randn(16, 24, generator=generator)
        loss = F.cross_entropy(built.model(x), torch.randint(0, 4, (16,), generator=generator))
        built.optimizer.zero_grad()
        loss.backward()
        built.optimizer.step()
        built.after_step(step)
        if step in evaluations:
            built.model.eval()
            with torch.no_grad():
                built.model(torch.randn(16, 24))
            built.model.train()
            seen.pop()  # evaluation forwards are not training forwards
    return built, seen, probe


def test_official_oialr_converts_before_the_delay_th_training_forward_and_cuts_at_once():
    built, seen, _ = mlp_run(12, evaluations=(2, 3), delay=5, frequency=3, beta=0.9)
    converted = [i + 1 for i, (svd, _) in enumerate(seen) if svd]
    assert converted[0] == 5  # OIALRModel: call_count == delay, before that forward
    ranks = [rank for _, rank in seen]
    # the first rotate-and-cut at the conversion itself, then every `frequency` forwards
    assert ranks[:4] == [24] * 4 and ranks[4] < 24
    changes = [i + 1 for i in range(1, len(ranks)) if ranks[i] != ranks[i - 1]]
    assert set(changes) <= {5, 8, 11}


def test_official_oialr_zeroes_adams_moments_at_conversion_and_keeps_the_step_count():
    built, _, dense = mlp_run(4, delay=5, frequency=100)
    state = dict(built.optimizer.state[dense.weight])
    assert float(state["step"]) == 4 and state["exp_avg"].abs().max() > 0
    built.after_step.clock.on_tick(5)  # what the 5th training forward would do first
    sigma = built.model[0][0].sigma
    carried = built.optimizer.state[sigma]
    assert float(carried["step"]) == 4  # kept: bias correction 1 − β^4, not a fresh 1 − β
    assert carried["exp_avg"].abs().max() == 0 and carried["exp_avg_sq"].abs().max() == 0
    # cut at the same tick: the zeroed moments were sliced to the new rank
    assert carried["exp_avg"].shape == sigma.shape


def test_official_oialr_slices_the_unrotated_moments_at_a_cut():
    built, _, _ = mlp_run(7, delay=3, frequency=100, beta=0.5)
    layer = built.model[0][0]
    before = {k: v.clone() for k, v in built.optimizer.state[layer.sigma].items()}
    rank = layer.rank
    built.after_step.cut("0.0")
    after = built.optimizer.state[layer.sigma]
    new = layer.rank
    assert new < rank
    torch.testing.assert_close(after["exp_avg"], before["exp_avg"][:new, :new], rtol=0, atol=0)
    torch.testing.assert_close(after["exp_avg_sq"], before["exp_avg_sq"][:new, :new],
                               rtol=0, atol=0)
    assert float(after["step"]) == float(before["step"])


def test_official_oialr_phases_layers_in_from_the_last():
    """test_basis_stability_all_layers: at the n-th update the last n·⌊(L − 1)·0.1⌋ layers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(13)], nn.Linear(16, 2))
    built = build_method("oialr", model, lr=1e-2, weight_decay=0.0, total_steps=40,
                         preset="official", delay=1, frequency=2, beta=0.9)
    paths = [str(i) for i in range(13)]  # the last eligible one, "13", stays dense
    assert official_oialr_layers(model) == paths
    x = torch.randn(8, 16)
    cut = []
    for step in range(1, 8):
        ranks_before = {p: getattr(built.model.get_submodule(p), "rank", 16) for p in paths}
        built.model(x).pow(2).mean().backward()
        built.optimizer.step()
        built.optimizer.zero_grad()
        ranks = {p: getattr(built.model.get_submodule(p), "rank", 16) for p in paths}
        cut.append({p for p in paths if ranks[p] < ranks_before[p]})
    step_of = int((len(paths) - 1) * 0.1)  # = 1
    # updates at forwards 1 (conversion), 3, 5, 7: the last 1, 2, 3, 4 layers take part
    taking_part = [set(paths[-n * step_of:]) for n in (1, 2, 3, 4)]
    updates = [cut[0], cut[2], cut[4], cut[6]]
    assert all(done <= allowed for done, allowed in zip(updates, taking_part))
    assert updates[2] == taking_part[2]  # β = 0.9 halves every layer that takes part


def test_official_oialr_freezes_the_bias_of_converted_layers():
    built, _, _ = mlp_run(3, delay=1, frequency=100)
    bias = built.model[0][0].bias
    before = bias.detach().clone()
    assert not bias.requires_grad
    assert all(p is not bias for g in built.optimizer.param_groups for p in g["params"])
    x = torch.randn(16, 24)
    built.model(x).pow(2).mean().backward()
    built.optimizer.step()
    assert torch.equal(bias, before)


# -- InRank: buffer, ceiling, window -------------------------------------------------------------

def official_window(s, current, buffer, alpha, max_modes):
    """in_rank_efficient.py: only while current < max_modes − buffer, the loop over
    range(current, min(current + buffer, max_modes − buffer)) that breaks at the first
    explained ratio > alpha and otherwise ends on the range's last index."""
    if current >= max_modes - buffer:
        return current
    index = current
    for index in range(current, min(current + buffer, max_modes - buffer)):
        kept = s.copy()
        kept[index:] = 0
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = 1 - np.var(s - kept) / np.var(s)
        if ratio > alpha:
            break
    return index


def test_official_window_matches_the_official_search_loop():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(6, 60))
        s = np.sort(rng.gamma(0.4, size=n) * (rng.random(n) < 0.8))[::-1].copy()
        max_modes = n // 2
        buffer = int(rng.integers(1, max(2, max_modes // 2)))
        current = int(rng.integers(0, max_modes))
        alpha = float(rng.uniform(0.5, 0.99))
        expected = official_window(s, current, buffer, alpha, max_modes)
        assert grow_rank(s, rank=current, buffer=buffer, alpha=alpha, max_rank=max_modes,
                         window="official") == expected


def official_inrank(width_in, width_out, **options):
    model = nn.Sequential(nn.Linear(width_in, width_out))
    return build_method("inrank-efficient", model, lr=1e-3, weight_decay=0.1, total_steps=300,
                        preset="official", layers="0", **options)


def test_official_inrank_buffer_and_ceiling_at_gpt2_small_and_at_our_width():
    gpt2 = official_inrank(768, 3072).model[0]  # GPT-2 small's fc1: the official config
    assert (gpt2.max_rank, gpt2.buffer, gpt2.rank) == (384, 100, 2)  # ⌊768/2⌋, buffer_modes
    ours = official_inrank(128, 512).model[0]  # the demo GPT's c_fc: scaled to its ceiling 64
    assert (ours.max_rank, ours.buffer) == (64, round(100 * 64 / 384))
    assert ours.u.shape == (512, 64) and ours.v.shape == (128, 64)  # all preallocated


def test_official_inrank_factors_are_kaiming_uniform_and_ignore_the_dense_init():
    torch.manual_seed(0)
    a = official_inrank(256, 512, seed=3).model[0]
    torch.manual_seed(1)
    b = official_inrank(256, 512, seed=3).model[0]  # another dense init, the same factors
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    # kaiming_uniform_(a=√5): U(±1/√fan_in); B = U (out, M) has fan_in M, A = Vᵀ fan_in = in
    for factor, fan_in in ((a.u, 128), (a.v, 256)):
        bound = 1 / math.sqrt(fan_in)
        assert factor.abs().max() <= bound
        assert factor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert a.bias.abs().max() == 0  # bias.data.zero_()
    x = torch.randn(5, 256)
    torch.testing.assert_close(a(x), x @ (a.u[:, :a.active_rank] @ a.v[:, :a.active_rank].T).T)


def test_official_inrank_counts_every_forward_call_evaluation_included():
    """iter += 1 in every forward; the rule runs at the forward where iter > warmup_iter and
    iter % gap_iter == 0, before that forward computes."""
    built = official_inrank(64, 96, warmup=10, every=5, seed=0)
    layer = built.model[0]
    ranks = []
    layer.eval()
    with torch.no_grad():
        for _ in range(40):
            ranks.append(layer.rank)
            layer(torch.randn(2, 64))
    # ranks[i]: the rank after i forwards; the rule ran inside forwards 15, 20, ...
    changes = [i for i in range(1, 40) if ranks[i] != ranks[i - 1]]
    assert changes[0] == 15 and all(c % 5 == 0 for c in changes)
    assert max(ranks) <= layer.max_rank - layer.buffer - 1  # the official ceiling on r
    rank = layer.rank
    for step in range(1, 40):
        built.after_step(step)  # optimizer steps do not advance the official schedule
    assert layer.rank == rank


def test_official_inrank_inactive_columns_only_decay_and_have_no_moments():
    built = official_inrank(32, 48, lr_scale=1.0, seed=0)
    layer = built.model[0]
    k = layer.active_rank
    waiting = layer.u[:, k:].detach().clone()
    lr, decay = 1e-3, 0.1
    for group in built.optimizer.param_groups:
        group["lr"] = lr
    x = torch.randn(16, 32)
    for _ in range(5):
        built.optimizer.zero_grad()
        layer(x).pow(2).mean().backward()
        built.optimizer.step()
    state = built.optimizer.state[layer.u]
    assert state["exp_avg"][:, k:].abs().max() == 0 and state["exp_avg_sq"][:, k:].abs().max() == 0
    torch.testing.assert_close(layer.u[:, k:].detach(), waiting * (1 - lr * decay) ** 5)


def test_official_inrank_slices_the_unrotated_moments_at_the_stage_switch():
    built = official_inrank(32, 48, seed=0)
    layer = built.model[0]
    with torch.no_grad():
        layer.rank = 3
    x = torch.randn(16, 32)
    for _ in range(3):
        built.optimizer.zero_grad()
        layer(x).pow(2).mean().backward()
        built.optimizer.step()
    before = {k: v.clone() for k, v in built.optimizer.state[layer.u].items()}
    built.after_step.truncate()
    after = built.optimizer.state[layer.u]
    assert layer.u.shape == (48, 3) and isinstance(layer, InRankEfficientLinear)
    torch.testing.assert_close(after["exp_avg"], before["exp_avg"][:, :3], rtol=0, atol=0)
    assert float(after["step"]) == float(before["step"]) == 3
