"""What a model class says about a checkpoint's tensors, and each tensor described to the matrix
rules (spectra.capture.rules) as a Candidate.

A tensor's layer (which decides its orientation) and its ties come from the model class when one
is known: a model the caller gives (any device, the meta device included: no weight of it is
read), or one built on the meta device from a HuggingFace config (the caller's ``model_config``,
else the checkpoint's own ``config.json``). The checkpoint's names are aligned with the model's
through the common prefix that maps the most of them (a LightningModule's ``model.`` around an
HF model, a base model's checkpoint read with its task head's class), and the model's buffers are
not candidates. Frozen parameters (``requires_grad=False``) of a given model are frozen.

Without a model class every tensor is "raw": taken as saved, (d0, d1·…), which is the (out, in)
orientation of nn.Linear and nn.ConvNd but not of transformers' Conv1D or nn.ConvTranspose, and
embeddings cannot be told from linear maps. Ties then come from the checkpoint alone (torch
files that store a tied tensor once).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.capture import rules
from spectra.capture.checkpoints.sources import Checkpoint
from spectra.capture.selection import parameter_layers, unwrap

_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM",
                 "AutoModelForSequenceClassification", "AutoModelForImageClassification",
                 "AutoModel")
WITHOUT_MODEL = ("as saved, (d0, d1·…): no model class known (no config.json; pass "
                 "model_config= / --model-config, or model=)")


@dataclass(frozen=True)
class Architecture:
    """A model class, as the importer needs it (no weights).

    description: which class and where it came from (kept in the store's attrs).
    layers: parameter name → (layer, groups), the orientation rule's input.
    order: parameter name → its position in the model's order.
    ties: names that share one parameter. buffers: names of buffers (not candidates).
    frozen: parameters that do not require grad.
    """

    description: str
    model: str
    layers: dict[str, tuple[str, int]]
    order: dict[str, int]
    ties: list[tuple[str, ...]]
    buffers: frozenset[str]
    frozen: frozenset[str]


@dataclass(frozen=True)
class Described:
    """A checkpoint tensor described to the rules, and how to read it as a stored matrix."""

    candidate: rules.Candidate
    key: str  # the checkpoint's tensor holding it
    layer: str
    groups: int

    def matrix(self, checkpoint: Checkpoint) -> torch.Tensor:
        """The (m, n) matrix in ``checkpoint`` (a view where the layout allows)."""
        return rules.as_matrix(checkpoint.read(self.key), self.layer, self.groups)


def from_model(model: nn.Module, description: str | None = None) -> Architecture:
    """The architecture of ``model`` (wrappers looked through; its weights are not read)."""
    model = unwrap(model)
    named = list(model.named_parameters(remove_duplicate=False))
    shared: dict[int, list[str]] = {}
    for name, p in named:
        shared.setdefault(id(p), []).append(name)
    return Architecture(
        description=description or f"{type(model).__name__} given as model=",
        model=type(model).__name__, layers=parameter_layers(model),
        order={name: i for i, (name, _) in enumerate(named)},
        ties=[tuple(names) for names in shared.values() if len(names) > 1],
        buffers=frozenset(name for name, _ in model.named_buffers()),
        frozen=frozenset(name for name, p in named if not p.requires_grad))


def from_config(config: Any, checkpoint: Checkpoint) -> Architecture:
    """The architecture a HuggingFace config describes: a path to a config.json (or a folder
    holding one) or a transformers PretrainedConfig. Its class is the config's first
    ``architectures`` entry that transformers has; a config that names none (one saved on its
    own) gets, of transformers' Auto classes, the one whose model holds the most of
    ``checkpoint``'s tensors (a causal LM's head, a classifier's)."""
    transformers = _transformers()
    config, where = _load_config(transformers, config)
    named = [getattr(transformers, name) for name in (config.architectures or [])
             if hasattr(transformers, name)]
    builders = named[:1] or [getattr(transformers, auto).from_config for auto in _AUTO_CLASSES
                             if hasattr(transformers, auto)]
    note = "" if named else (f" (the config names no architecture: of the Auto classes for "
                             f"model_type {config.model_type!r}, the one that holds the most of "
                             "the checkpoint's tensors)")
    built = []
    for build in builders:
        with _quiet(transformers), torch.device("meta"):
            try:
                model = build(config)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # an Auto class that has no model for this config
        built.append(from_model(model, f"{type(model).__name__} built from {where}{note}"))
    if not built:
        raise ValueError(f"cannot build the model that {where} describes; pass model= (an "
                         "nn.Module of the checkpoints' architecture)")
    names = _matrix_names(checkpoint)
    return max(built, key=lambda a: sum(_Alignment.best(names, a).to_model(n) is not None
                                        for n in names))


def describe(checkpoint: Checkpoint, architecture: Architecture | None,
             frozen: Collection[str] = ()) -> list[Described]:
    """Each ≥2-D tensor of ``checkpoint`` (tied ones once) as a rules.Candidate, in the model's
    order (the checkpoint's without an architecture). ``frozen``: names known not to train."""
    names = _matrix_names(checkpoint)
    align = _Alignment.of(names, architecture, checkpoint)
    if architecture is not None:
        names = [n for n in names if align.to_model(n) not in architecture.buffers]
    index = {n: i for i, n in enumerate(checkpoint.tensors)}
    described = []
    for group in _tie_groups(names, checkpoint, architecture, align):
        present = [n for n in group if n in checkpoint.tensors]
        if not present:
            continue
        group = sorted(group, key=lambda n: align.position(n, index))
        layers = [align.layer(n) for n in group]
        chosen = rules.tie_name(group, [layer for layer, _ in layers])
        name, (layer, groups) = group[chosen], layers[chosen]
        info = checkpoint.tensors[present[0]]
        stops = name in frozen or (architecture is not None
                                   and align.to_model(name) in architecture.frozen)
        candidate = rules.Candidate(
            name=name, shape=info.shape, dtype=info.dtype, layer=layer, groups=groups,
            trainable=False if stops else None,
            aliases=tuple(n for i, n in enumerate(group) if i != chosen))
        described.append(Described(candidate, present[0], layer, groups))
    return sorted(described, key=lambda d: align.position(d.candidate.name, index))


def orientation(architecture: Architecture | None) -> str:
    """How the matrices were oriented, for the store's attrs and the command's output."""
    return WITHOUT_MODEL if architecture is None else architecture.description


@dataclass(frozen=True)
class _Alignment:
    """Checkpoint names ↔ model names: a checkpoint name is ``checkpoint`` + rest where the
    model's is ``model`` + rest (one of the two prefixes is empty)."""

    architecture: Architecture | None
    checkpoint: str = ""
    model: str = ""

    @classmethod
    def of(cls, names: Sequence[str], architecture: Architecture | None,
           source: Checkpoint) -> _Alignment:
        """The best alignment; ValueError if it maps fewer than half of ``names``."""
        align = cls.best(names, architecture)
        mapped = [n for n in names if align.to_model(n) is not None]
        if architecture is not None and 2 * len(mapped) < len(names):
            strangers = [n for n in names if n not in mapped][:3]
            raise ValueError(f"{source.path}: {architecture.description} describes only "
                             f"{len(mapped)} of its {len(names)} matrices (none for {strangers}); "
                             "pass the model config (or model=) of these checkpoints")
        return align

    @classmethod
    def best(cls, names: Sequence[str], architecture: Architecture | None) -> _Alignment:
        """The prefixes that map the most of ``names`` to the architecture's names."""
        if architecture is None or not names:
            return cls(architecture)
        known = set(architecture.layers) | architecture.buffers
        votes: Counter = Counter()
        for name in names:
            parts = name.split(".")
            for i in range(len(parts)):
                head, tail = ".".join(parts[:i]), ".".join(parts[i:])
                if tail in known:
                    votes[(head, "")] += 1
            votes.update(("", p[:-len(name) - 1]) for p in known if p.endswith("." + name))
        best = max(votes.items(), key=lambda kv: (kv[1], kv[0] == ("", "")), default=None)
        return cls(architecture, *best[0]) if best else cls(architecture)

    def to_model(self, name: str) -> str | None:
        if self.architecture is None:
            return None
        if self.checkpoint and not name.startswith(self.checkpoint + "."):
            return None
        rest = name[len(self.checkpoint) + 1:] if self.checkpoint else name
        param = f"{self.model}.{rest}" if self.model else rest
        known = param in self.architecture.layers or param in self.architecture.buffers
        return param if known else None

    def to_checkpoint(self, param: str) -> str | None:
        if self.model and not param.startswith(self.model + "."):
            return None
        rest = param[len(self.model) + 1:] if self.model else param
        return f"{self.checkpoint}.{rest}" if self.checkpoint else rest

    def layer(self, name: str) -> tuple[str, int]:
        param = self.to_model(name)
        return self.architecture.layers.get(param, ("raw", 1)) if param else ("raw", 1)

    def position(self, name: str, index: dict[str, int]) -> tuple[int, int]:
        """Sort key: model order first, then the checkpoint's order for names it lacks."""
        param = self.to_model(name)
        if param is not None and param in self.architecture.order:
            return (0, self.architecture.order[param])
        return (1, index.get(name, len(index)))


def _matrix_names(checkpoint: Checkpoint) -> list[str]:
    return [n for n, info in checkpoint.tensors.items() if len(info.shape) >= 2]


def _tie_groups(names: Sequence[str], checkpoint: Checkpoint, architecture: Architecture | None,
                align: _Alignment) -> list[list[str]]:
    """``names`` grouped by the tensor they hold: ties the checkpoint stores (shared storage) and
    ties of the model whose other names the checkpoint does not hold (one that holds two of
    them as separate tensors untied them)."""
    ties = list(checkpoint.ties)
    stored = {n: set(tie) for tie in checkpoint.ties for n in tie}
    for tie in architecture.ties if architecture is not None else []:
        tie = tuple(n for n in map(align.to_checkpoint, tie) if n is not None)
        held = [n for n in tie if n in checkpoint.tensors]
        if len(held) < 2 or set(held) <= stored.get(held[0], set()):
            ties.append(tie)
    groups = [[n] for n in names]
    for tie in ties:
        touched = [g for g in groups if set(g) & set(tie)]
        if not touched:
            continue
        merged = list(dict.fromkeys([n for g in touched for n in g] + list(tie)))
        groups = [g for g in groups if g not in touched] + [merged]
    return groups


def _load_config(transformers: Any, config: Any) -> tuple[Any, str]:
    """(the PretrainedConfig, where it came from) of a path or a PretrainedConfig."""
    if isinstance(config, transformers.PretrainedConfig):
        return config, f"the given {type(config).__name__}"
    if not isinstance(config, str | os.PathLike):
        raise TypeError(f"model_config must be a path to a config.json or a transformers "
                        f"PretrainedConfig; got {type(config).__name__}")
    where = Path(config)
    if not where.exists():
        raise FileNotFoundError(f"model config {where}: no such file or folder")
    with _quiet(transformers):
        try:
            loaded = transformers.AutoConfig.from_pretrained(str(where))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"model config {where}: not a HuggingFace config ({exc})") from None
    return loaded, str(where / "config.json" if where.is_dir() else where)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("reading a HuggingFace config needs the transformers package (pip "
                         "install transformers), or pass model= (an nn.Module)") from None
    return transformers


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' logging at errors only, for a block (config warnings are not ours)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
