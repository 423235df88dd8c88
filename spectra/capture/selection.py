"""Which matrices of a live model the Recorder records, and how to read each one.

The rules (orientation, names, ties, what is skipped) live in spectra.capture.rules; this module
describes a model to them:
- wrappers are looked through: DistributedDataParallel / DataParallel, torch.compile's
  OptimizedModule (also on submodules: names never hold ``_orig_mod``), peft's PeftModel — so
  names are the plain model's, and a store recorded through one resumes through the other;
- each parameter's layer comes from its module's type: nn.Linear, transformers' Conv1D
  (stored transposed), nn.ConvNd, nn.ConvTransposeNd, nn.Embedding; others are "raw";
- a parameter held by several modules (a tied output head) is one matrix (rules.tie_name);
- a module whose ``weight`` is a tensor but not a Parameter (a low-rank layer, a
  torch.nn.utils.parametrize'd layer) is recorded through that dense effective weight;
- a peft adapter layer (LoRA and any tuner with ``get_delta_weight``) is recorded as its
  effective weight W_0 + Σ_a ΔW_a over its active, unmerged adapters (for LoRA ΔW = s·B·A),
  summed in float64, under the adapted layer's own name; peft's ``modules_to_save`` copies
  under the wrapped module's name;
- the parameters behind a computed or adapted weight (factors, frozen base) are parts: recorded
  only when an include pattern names them;
- a module's parameters are frozen when none of them requires grad.

Each matrix is read through its module path at every snapshot, so a layer that changes its
parametrisation in place (OIALR converting U Σ Vᵀ) or a module replaced in its parent keeps
being recorded, as long as the (m, n) shape stays the same. Parameters may be DTensors (FSDP2):
``tensors()`` returns them as the model holds them, ``combine`` works on plain tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from spectra.capture import rules
from spectra.store import MatrixSpec


@dataclass(frozen=True)
class RecordedMatrix:
    """One matrix to record: its stored description and how to read its current value.

    tensors: the live tensors the matrix is made of (a parameter; an adapter's base weight and
        deltas), as the model holds them: DTensors under FSDP2, on the model's device.
    combine: those tensors, as plain full tensors, → the stored (m, n) matrix.
    """

    spec: MatrixSpec
    tensors: Callable[[], list[torch.Tensor]]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]

    def read(self) -> torch.Tensor:
        """The (m, n) matrix now (no grad; the model's tensors must not be sharded)."""
        with torch.no_grad():
            return self.combine(self.tensors())


def select_matrices(model: nn.Module, *, include: str | Sequence[str] | None = None,
                    exclude: str | Sequence[str] | None = None, embeddings: bool = False,
                    trainable_only: bool = True) -> list[RecordedMatrix]:
    """The matrices of ``model`` (wrappers looked through) to record, in model order.

    Raises ValueError if an include pattern selects nothing or no matrix remains.
    """
    model = unwrap(model)
    _refuse_flat_parameters(model)
    described = _describe(model)
    specs = rules.choose([c for c, _, _ in described], include=include, exclude=exclude,
                         embeddings=embeddings, trainable_only=trainable_only,
                         source=type(model).__name__)
    readers = {c.name: (tensors, combine) for c, tensors, combine in described}
    return [RecordedMatrix(spec, *readers[spec.name]) for spec in specs]


def parameter_layers(model: nn.Module) -> dict[str, tuple[str, int]]:
    """(layer, groups) of every ≥2-D parameter of ``model`` by its name in the model's state
    dict (wrappers not looked through): how rules.as_matrix orients that tensor. A model built
    from its config on the meta device tells a checkpoint's layers without any weights."""
    return {name: _layer(*_owner(model, name))
            for name, p in model.named_parameters(remove_duplicate=False) if p.ndim >= 2}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel, torch.compile and peft wrappers (any nesting)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif _instance(model, "torch._dynamo.eval_frame", "OptimizedModule"):
            model = model._orig_mod
        elif _instance(model, "peft.peft_model", "PeftModel"):
            model = model.get_base_model()
        else:
            return model


# -- describing a model to the rules -----------------------------------------------------------

Reader = tuple[rules.Candidate, Callable[[], list[torch.Tensor]],
               Callable[[list[torch.Tensor]], torch.Tensor]]


def _describe(model: nn.Module) -> list[Reader]:
    """A candidate and its reader for each computed weight and each ≥2-D parameter, in model
    order (modules in definition order, each followed by its own parameters)."""
    computed = dict(_computed_modules(model))
    copies = _modules_to_save(model)
    walk: list[tuple[str, str, nn.Module | nn.Parameter]] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if computed.get(path) is module:
            walk.append(("computed", path, module))
        walk += [("param", _join(path, attr), p) for attr, p in module._parameters.items()
                 if p is not None and p.ndim >= 2]
    position = {name: i for i, (_, name, _) in enumerate(walk)}
    tied: dict[int, list[str]] = {}
    for what, name, obj in walk:
        if what == "param":
            tied.setdefault(id(obj), []).append(name)
    described: list[tuple[int, Reader]] = []
    for i, (what, name, obj) in enumerate(walk):
        if what == "computed":
            described.append((i, _computed_reader(model, name, obj)))
        elif tied[id(obj)][0] == name:  # a tied parameter sorts at the name it is recorded under
            real, reader = _parameter_reader(model, obj, tied[id(obj)], computed, copies)
            described.append((position[real], reader))
    return [reader for _, reader in sorted(described, key=lambda item: item[0])]


def _parameter_reader(model: nn.Module, p: nn.Parameter, real: list[str],
                      computed: dict[str, nn.Module],
                      copies: dict[str, nn.Module]) -> tuple[str, Reader]:
    """A plain parameter (held under the names ``real``): one candidate, tied names as aliases;
    a part when every name lies inside a computed weight's module or is an inactive copy.
    Returns the real name it is read through and its reader."""
    shown = [(name, _display(name, copies)) for name in real]
    public = [(name, display) for name, display in shown
              if display is not None and not any(_under(name, c) for c in computed)]
    part = not public
    if part:
        public = [(real[0], rules.clean_name(real[0]))]
    layers = [_layer(*_owner(model, name)) for name, _ in public]
    chosen = rules.tie_name([display for _, display in public], [layer for layer, _ in layers])
    name, display = public[chosen]
    layer, groups = layers[chosen]
    path, _, attr = name.rpartition(".")
    candidate = rules.Candidate(
        name=display, shape=tuple(p.shape), dtype=_dtype_name(p.dtype), layer=layer,
        trainable=p.requires_grad, groups=groups, part=part,
        aliases=tuple(d for i, (_, d) in enumerate(public) if i != chosen))
    return name, (candidate, lambda: [getattr(model.get_submodule(path), attr)],
                  lambda tensors: rules.as_matrix(tensors[0], layer, groups))


def _computed_reader(model: nn.Module, path: str, module: nn.Module) -> Reader:
    """A module recorded through a weight it computes: a peft adapter or an effective weight."""
    name = rules.clean_name(_join(path, "weight"))
    params = list(module.parameters())
    trainable = any(p.requires_grad for p in params) if params else None
    base = _adapter_base(module)
    if base is None:
        layer, groups = _layer(module, "weight")
        candidate = rules.Candidate(name=name, shape=tuple(_effective(module).shape),
                                    dtype=_dtype_name(_effective(module).dtype), layer=layer,
                                    kind="effective", trainable=trainable, groups=groups)
        return (candidate, lambda: [model.get_submodule(path).weight],
                lambda tensors: rules.as_matrix(tensors[0], layer, groups))
    layer, groups = _layer(base, "weight")
    dtypes = [base.weight.dtype] + [p.dtype for n, p in module.named_parameters()
                                    if n.split(".")[0] in module.adapter_layer_names]
    candidate = rules.Candidate(
        name=name, shape=tuple(base.weight.shape), dtype=_dtype_name(_promote(dtypes)),
        layer=layer, trainable=trainable, groups=groups, attrs={"adapter": _adapter_notes(module)})
    return (candidate, lambda: _adapter_tensors(model.get_submodule(path)),
            lambda tensors: rules.as_matrix(_sum64(tensors), layer, groups))


def _adapter_tensors(module: nn.Module) -> list[torch.Tensor]:
    """[W_0, ΔW_a for each active adapter not merged into W_0] of a peft tuner layer."""
    base = module.get_base_layer().weight
    if module.disable_adapters:
        return [base]
    merged = set(module.merged_adapters)
    return [base] + [module.get_delta_weight(a) for a in module.active_adapters
                     if a not in merged and a in module._get_available_adapters()]


def _adapter_notes(module: nn.Module) -> dict:
    """What the store keeps about an adapter layer (JSON-serialisable)."""
    cls = type(module)
    notes = {"class": f"{cls.__module__}.{cls.__qualname__}",
             "active": list(module.active_adapters)}
    for field in ("r", "scaling"):  # LoRA's rank and scale s per adapter
        value = getattr(module, field, None)
        if isinstance(value, dict):
            notes[field] = {str(k): v for k, v in value.items() if isinstance(v, int | float)}
    return notes


def _computed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost modules recorded through a computed weight: adapters and effective weights."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(_under(path, outer) for outer, _ in found):
            continue
        if _adapter_base(module) is not None or _effective(module) is not None:
            found.append((path, module))
    return found


def _adapter_base(module: nn.Module) -> nn.Module | None:
    """The base layer of a peft tuner layer that can compute its delta weight, else None."""
    if not (_instance(module, "peft.tuners.tuners_utils", "BaseTunerLayer")
            and hasattr(module, "get_delta_weight")):
        return None
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    return base if isinstance(weight, torch.Tensor) and weight.ndim >= 2 else None


def _effective(module: nn.Module) -> torch.Tensor | None:
    """``module.weight`` if it is a ≥2-D tensor that is not a Parameter (computed), else None."""
    if "weight" in module._parameters:
        return None
    with torch.no_grad():
        weight = getattr(module, "weight", None)
    ok = isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter) and weight.ndim >= 2
    return weight if ok else None


def _modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """peft's ModulesToSaveWrapper modules by path (trained copies of whole modules)."""
    return {path: m for path, m in model.named_modules()
            if _instance(m, "peft.utils.other", "ModulesToSaveWrapper")}


def _display(name: str, copies: dict[str, nn.Module]) -> str | None:
    """The name users look for, or None for a name that is not the model's live weight (peft's
    frozen original of a module it trains a copy of, or a copy for an inactive adapter)."""
    for path, wrapper in copies.items():
        if not _under(name, path) or name == path:
            continue
        rest = name[len(path) + 1:] if path else name
        active = wrapper.active_adapters[0] if wrapper.active_adapters else None
        head, _, tail = rest.partition(".")
        if head == "modules_to_save" and tail.partition(".")[0] == active:
            return rules.clean_name(_join(path, tail.partition(".")[2]))
        if head in ("modules_to_save", "original_module"):
            return None
    return rules.clean_name(name)


def _layer(module: nn.Module, attr: str) -> tuple[str, int]:
    """(layer, groups) of ``module.<attr>`` for the orientation rule (spectra.capture.rules)."""
    if attr != "weight":
        return "raw", 1
    if isinstance(module, nn.Linear):
        return "linear", 1
    if _instance(module, "transformers.pytorch_utils", "Conv1D"):
        return "transposed_linear", 1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose", module.groups
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", 1
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding", 1
    return "raw", 1


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def _refuse_flat_parameters(model: nn.Module) -> None:
    """FSDP1 flattens parameters into 1-D buffers: no matrix survives to be recorded."""
    if any(_instance(m, "torch.distributed.fsdp.fully_sharded_data_parallel",
                     "FullyShardedDataParallel") for m in model.modules()):
        raise ValueError("the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
                         "1-D parameters hold no matrices; shard it with "
                         "torch.distributed.fsdp.fully_shard (FSDP2) instead")


def _instance(obj: object, module: str, cls: str) -> bool:
    """isinstance(obj, module.cls) without importing ``module`` (if it is not loaded, no
    object can be an instance of its classes)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, cls))


def _sum64(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].to(torch.float64)
    for t in tensors[1:]:
        total = total + t.to(device=total.device, dtype=torch.float64)
    return total


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _join(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _under(name: str, prefix: str) -> bool:
    """True if the dotted ``name`` is ``prefix`` or lies inside module ``prefix`` ("" = root)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")
