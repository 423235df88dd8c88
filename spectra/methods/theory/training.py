"""Train one toy deep linear network and record it with the ordinary Recorder.

A :class:`Setting` names everything a run depends on; :func:`train` builds the teacher, the
whitened data and the network from its seed, trains with full-batch gradient descent ("gd"),
mini-batch SGD ("sgd") or Adam ("adam"), and records every layer W_l and the end-to-end product
W (``product.weight``) into a run store, with the step's training loss as the scalar ``loss``
(on whitened inputs the full-batch loss is ½‖W − T‖²_F).
The setting and the teacher go into the store's attrs (``theory``), so the store alone is
enough to measure the run (spectra.methods.theory.measure).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import trange

from spectra.capture.recorder import Recorder
from spectra.capture.schedules import Steps
from spectra.store import annotate_run
from spectra.methods.theory.closed_forms import crossing_time
from spectra.methods.theory.linear_nets import (DeepLinearNet, Teacher, init_orthogonal, make_teacher,
                                        whitened_inputs)

OPTIMIZERS = ("gd", "sgd", "adam")
INITS = ("orthogonal", "aligned")
DEFAULT_LR = {"gd": 0.005, "sgd": 0.005, "adam": 0.002}
_NAME_CODES = {"teacher": "t", "dim": "n", "width": "w", "lr": "lr", "steps": "T",
               "batch_size": "b", "samples": "N", "snapshots": "k"}


@dataclass(frozen=True)
class Setting:
    """One toy run.

    depth: number of weight matrices D (≥ 2). alpha: init scale α (each W_l = α·orthogonal).
    optimizer: "gd" (full batch), "sgd" (mini-batches of ``batch_size``) or "adam" (full batch).
    teacher: the teacher's distinct singular values, descending. dim: input = output size;
    width: hidden size. lr: learning rate (default 0.005 for gd/sgd, so τ = 200 steps; 0.002
    for adam). steps: optimizer steps (default: ``default_steps``). samples: size of the
    whitened data set.
    init: "orthogonal" (random) or "aligned" (every mode along the teacher's, Saxe et al.).
    snapshots: how many snapshots to record (besides W_0), geometrically spaced over the last
    two decades of steps, where modes with time constants ∝ 1/s are learned.
    """

    depth: int = 3
    alpha: float = 0.1
    optimizer: str = "gd"
    teacher: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0)
    dim: int = 8
    width: int = 32
    lr: float | None = None
    steps: int | None = None
    batch_size: int = 16
    samples: int = 256
    init: str = "orthogonal"
    seed: int = 0
    snapshots: int = 60

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; accepted: {', '.join(INITS)}")
        if not isinstance(self.depth, int) or self.depth < 2:
            raise ValueError(f"depth={self.depth!r}; must be an int >= 2")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r}; must be > 0")
        for name in ("steps", "snapshots", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}; must be a positive int")
        if self.batch_size > self.samples:
            raise ValueError(f"batch_size={self.batch_size} exceeds samples={self.samples}")
        object.__setattr__(self, "teacher", tuple(float(s) for s in self.teacher))

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def tau(self) -> float:
        """The time constant 1/η in steps (meaningful for gd and sgd)."""
        return 1.0 / self.learning_rate

    @property
    def name(self) -> str:
        """A file-name-safe label naming every field that differs from its default, e.g.
        ``d3-a0.1-gd-s0`` or ``d3-a0.05-sgd-w64-b4-s2``."""
        parts = [f"d{self.depth}", f"a{self.alpha:g}", self.optimizer]
        parts += [] if self.init == "orthogonal" else [self.init]
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _NAME_CODES and value != field.default:
                text = "_".join(f"{v:g}" for v in value) if isinstance(value, tuple) else \
                    f"{value:g}"
                parts.append(_NAME_CODES[field.name] + text)
        return "-".join(parts + [f"s{self.seed}"])


def train(setting: Setting, path: str | Path, *, quiet: bool = False) -> Path:
    """Train ``setting`` and record it into a new store at ``path``. Returns the path."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; train() records into a new store only")
    generator = torch.Generator().manual_seed(setting.seed)
    teacher = make_teacher(setting.teacher, setting.dim, generator)
    inputs = whitened_inputs(setting.samples, setting.dim, generator)
    outputs = inputs @ torch.from_numpy(teacher.matrix).T
    net = DeepLinearNet(setting.dim, setting.width, setting.depth)
    init_orthogonal(net, setting.alpha, generator,
                    aligned_to=teacher if setting.init == "aligned" else None)
    steps = setting.steps or default_steps(setting, teacher, net.product.weight.detach().numpy())
    optimizer = _optimizer(setting, net.parameters())
    batches = _batches(setting, generator)
    config = {"task": "theory-linear-net", **asdict(setting)}
    schedule = snapshot_steps(steps, setting.snapshots)
    with Recorder(net, path, schedule=schedule, config=config,
                  max_pending=len(schedule.steps)) as rec:
        for _ in trange(steps, desc=setting.name, disable=quiet, leave=False):
            rows = next(batches)
            fit = net(inputs[rows]) - outputs[rows]
            loss = 0.5 * fit.pow(2).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss.item())
    annotate_run(path, theory={"setting": asdict(setting), "teacher": teacher.to_json(),
                               "lr": setting.learning_rate, "steps": steps})
    return path


def default_steps(setting: Setting, teacher: Teacher, product0: np.ndarray) -> int:
    """gd, sgd: 1.5× the closed-form time (τ = 1/lr steps) at which the weakest teacher mode
    reaches 95% of its value, starting from its projection on ``product0`` = W_0 (at least
    100). adam, which has no such law: 4/lr steps (Adam moves each weight by about lr per step;
    measured with the default teacher, the weakest mode reached 90% by step 1000 at lr = 0.002
    for every α from 0.02 to 0.5)."""
    if setting.optimizer == "adam":
        return math.ceil(4.0 / setting.learning_rate)
    weakest = teacher.rank - 1
    s = teacher.s[weakest]
    m0 = float(teacher.u[:, weakest] @ product0 @ teacher.v[:, weakest])
    t95 = crossing_time(0.95, s, m0, setting.alpha, setting.depth, setting.tau)
    if not math.isfinite(t95):
        raise ValueError(f"{setting.name}: the weakest mode starts exactly anti-aligned and never "
                         "moves under gradient flow; pass steps= explicitly")
    return max(100, math.ceil(1.5 * t95))


def snapshot_steps(steps: int, count: int) -> Steps:
    """0 and ``count`` steps spaced geometrically from steps/100 to ``steps``, rounded (so
    fewer where that grid is denser than one per step)."""
    grid = np.geomspace(max(1.0, steps / 100), steps, count)
    return Steps(sorted({0, *np.round(grid).astype(int).tolist()}))


def _optimizer(setting: Setting, params: Any) -> torch.optim.Optimizer:
    if setting.optimizer == "adam":
        return torch.optim.Adam(params, lr=setting.learning_rate)
    return torch.optim.SGD(params, lr=setting.learning_rate)


def _batches(setting: Setting, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of each step's batch: all rows (gd, adam), or shuffled mini-batches (sgd)."""
    everything = torch.arange(setting.samples)
    if setting.optimizer != "sgd":
        while True:
            yield everything
    while True:
        order = torch.randperm(setting.samples, generator=generator)
        for start in range(0, setting.samples - setting.batch_size + 1, setting.batch_size):
            yield order[start:start + setting.batch_size]
