"""Minimal training loops for the demo and the studies (plain PyTorch, recorded with spectra).

Each loop calls ``after_step(step)`` after every optimizer step (1-based, like Recorder steps):
that is where a Recorder or a low-rank controller plugs in. The returned history is a list of
dicts (one per evaluation) that pandas turns into a frame. Each loop trains with ``threads``
torch threads (spectra.core.threads: one by default, the fast choice on a shared machine;
None leaves torch's setting alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from spectra.core.threads import TRAINING_THREADS, torch_threads
from spectra.methods.registry import adamw_for
from spectra.tasks.data import CharCorpus, Classification

LN2 = math.log(2.0)
AfterStep = Callable[[int, float], None]  # (step, training loss) → None


@dataclass
class GPTTraining:
    """Hyperparameters of the character-GPT loop (AdamW, linear warm-up, cosine decay)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate_bpc(model: nn.Module, corpus: CharCorpus, split: str = "val", batches: int = 20,
                 batch_size: int = 32, seed: int = 1234) -> float:
    """Mean cross-entropy on ``batches`` fixed random windows of ``split``, in bits per character."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(batches):
        x, y = corpus.batch(split, batch_size, model.config.block_size, generator)
        _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / batches / LN2


def train_char_gpt(model: nn.Module, corpus: CharCorpus, config: GPTTraining, *,
                   optimizer: torch.optim.Optimizer | None = None,
                   after_step: AfterStep | None = None, quiet: bool = False,
                   threads: int | None = TRAINING_THREADS) -> list[dict]:
    """Train ``model`` (a models.GPT) on ``corpus``; returns evaluations
    [{step, train_bpc, val_bpc, seconds}] every ``eval_every`` steps and at the end.

    The learning rate follows ``config.lr_at``, times a parameter group's ``lr_scale`` if it has one.
    """
    with torch_threads(threads):
        device = next(model.parameters()).device
        optimizer = optimizer or adamw_for(model, config.lr, config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        history, start = [], time.perf_counter()
        model.train()
        for step in tqdm(range(config.steps), desc="gpt", disable=quiet, leave=False):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step) * group.get("lr_scale", 1.0)
            x, y = corpus.batch("train", config.batch_size, model.config.block_size, generator)
            _, loss = model(x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step(step + 1, loss.item())
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                history.append({"step": step + 1, "train_bpc": loss.item() / LN2,
                                "val_bpc": evaluate_bpc(model, corpus, "val", config.eval_batches),
                                "seconds": time.perf_counter() - start})
        return history


@dataclass
class ClassifierTraining:
    """Hyperparameters of the classifier loop (mini-batch AdamW, constant learning rate)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` (N, d) classified as ``y`` (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = (model(x.to(device)).argmax(dim=1).cpu() == y).float().mean().item()
    model.train(was_training)
    return correct


def train_classifier(model: nn.Module, data: Classification, config: ClassifierTraining, *,
                     optimizer: torch.optim.Optimizer | None = None,
                     after_step: AfterStep | None = None, quiet: bool = False,
                     threads: int | None = TRAINING_THREADS) -> list[dict]:
    """Train ``model`` on ``data``; returns [{epoch, step, train_loss, test_accuracy, seconds}]."""
    with torch_threads(threads):
        device = next(model.parameters()).device
        optimizer = optimizer or adamw_for(model, config.lr, config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        n = len(data.y_train)
        history, step, start = [], 0, time.perf_counter()
        for epoch in tqdm(range(config.epochs), desc="mlp", disable=quiet, leave=False):
            model.train()
            order = torch.randperm(n, generator=generator)
            for first in range(0, n, config.batch_size):
                batch = order[first:first + config.batch_size]
                logits = model(data.x_train[batch].to(device))
                loss = F.cross_entropy(logits, data.y_train[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if after_step is not None:
                    after_step(step, loss.item())
            history.append({"epoch": epoch + 1, "step": step, "train_loss": loss.item(),
                            "test_accuracy": accuracy(model, data.x_test, data.y_test),
                            "seconds": time.perf_counter() - start})
        return history
