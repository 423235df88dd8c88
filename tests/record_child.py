"""Child process for the kill and two-writer tests: records a deterministic run at every step.

    python record_child.py STORE [--seed S] [--steps N] [--until FILE] [--pace SECONDS]

A store that exists is resumed: the model is replayed to the store's last snapshot first (the
trajectory is deterministic and SGD without momentum keeps no state). Prints "recording" once
the Recorder is about to open the store, "opened" once it has. Steps: N, or until FILE exists,
or forever; with a pause of SECONDS after each.
"""

import argparse
import os
import time

import torch

import spectra
from spectra.capture.recorder import Recorder
from spectra.store import existing


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))


def trajectory_step(model, optimizer, k, seed=0):
    """The k-th (1-based) training step: deterministic full-batch regression."""
    g = torch.Generator().manual_seed(1000 * seed + k)
    x = torch.randn(128, 64, generator=g)
    loss = (model(x) - x[:, :32]).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def trajectory(steps, seed=0):
    """{step: {name: W}} of the first ``steps`` steps (0 included), computed independently."""
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {}
    for k in range(steps):
        if k:
            trajectory_step(model, optimizer, k, seed)
        out[k] = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.ndim == 2}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10**9)
    parser.add_argument("--until", help="stop (and close) once this file exists")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds to sleep per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_model(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    done = len(spectra.open_run(args.store)) if existing(args.store) == "store" else 0
    for k in range(1, done):
        trajectory_step(model, optimizer, k, args.seed)
    print("recording", flush=True)
    with Recorder(model, args.store, every=1) as rec:
        print("opened", flush=True)
        for k in range(max(done, 1), args.steps + 1):
            if args.until and os.path.exists(args.until):
                break
            rec.step(loss=trajectory_step(model, optimizer, k, args.seed))
            time.sleep(args.pace)


if __name__ == "__main__":
    main()
