"""A low-rank run checkpointed mid-training and resumed matches the uninterrupted run bitwise."""

import io
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spectra.methods import build_method


pytestmark = pytest.mark.usefixtures("one_thread")


def block(seed):
    """An attention-like Linear and an MLP (what InRank converts by default)."""
    return nn.Sequential(OrderedDict(attn=nn.Linear(12, 12), act=nn.Tanh(),
                                     mlp=nn.Sequential(nn.Linear(12, 20), nn.GELU(),
                                                       nn.Linear(20, 12))))


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def batch(step, width):
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, width, generator=generator)
    return x, torch.sin(2 * x[:, :3] if width == 10 else 2 * x)


def train(method, first, last, width):
    """Steps first..last (1-based): returns the losses and the controller's scalars."""
    trace = []
    for step in range(first, last + 1):
        x, y = batch(step, width)
        loss = F.mse_loss(method.model(x), y)
        method.optimizer.zero_grad()
        loss.backward()
        method.optimizer.step()
        trace.append((loss.item(), method.after_step(step)))
    return trace


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


CASES = {
    "inrank-increment": (block, 12, "inrank",
                         {"layers": "mlp.*", "rank": 1, "buffer": 2, "every": 3, "warmup": 2,
                          "rule_input": "increment", "lr_scale": 2.0}),
    "inrank-efficient": (block, 12, "inrank-efficient",
                         {"layers": "mlp.*", "rank": 1, "buffer": 3, "every": 3, "warmup": 2,
                          "search_steps": 12}),
    "oialr": (mlp, 10, "oialr", {"delay": 4, "frequency": 3, "beta": 0.5,
                                 "keep_first": False}),
    "oialr-stability": (mlp, 10, "oialr-stability",
                        {"check_every": 2, "ratio": 0.05, "window": 2, "frequency": 3,
                         "beta": 0.5, "keep_first": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_resumed_from_a_checkpoint_matches_the_uninterrupted_run_bitwise(case):
    make, width, name, options = CASES[case]
    steps, cut = 24, 9

    def build(seed):
        torch.manual_seed(seed)
        return build_method(name, make(seed), lr=2e-2, weight_decay=0.1, total_steps=steps,
                            **options)

    whole = build(0)
    reference = train(whole, 1, steps, width)

    first = build(0)
    head = train(first, 1, cut, width)
    checkpoint = roundtrip(first.state_dict())
    resumed = build(7)  # another initialisation: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint)
    tail = train(resumed, cut + 1, steps, width)

    assert head + tail == reference  # every loss and every scalar, exactly
    final, expected = resumed.model.state_dict(), whole.model.state_dict()
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        same = value == final[key] if key.endswith("_extra_state") else torch.equal(value, final[key])
        assert same, key
    # the controller did act after the checkpoint, so the test exercises its restored state
    assert any(a[1] != b[1] for a, b in zip(reference[cut:], reference[cut - 1:]))
