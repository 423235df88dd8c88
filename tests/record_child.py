"""Child process for the SIGKILL test: records a deterministic run at every step, forever."""

import sys

import torch

import spectra
from spectra.capture.recorder import Recorder


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))


def trajectory_step(model, optimizer, k):
    """The k-th (1-based) training step: deterministic full-batch regression."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(128, 64, generator=g)
    loss = (model(x) - x[:, :32]).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


if __name__ == "__main__":
    torch.set_num_threads(1)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, sys.argv[1], every=1) as rec:
        for k in range(1, 100_000):
            rec.step(loss=trajectory_step(model, optimizer, k))
