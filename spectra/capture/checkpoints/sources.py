"""Reading checkpoints one tensor at a time.

:func:`open_checkpoint` opens one checkpoint and returns a :class:`Checkpoint`: the names,
shapes and dtypes of its floating-point tensors (from headers: no weights are read), the steps
its metadata states, the scalars its trainer logged at that step, the ``config.json`` that
describes its model, and :meth:`Checkpoint.read` for one tensor at a time. Accepted:

- torch files (``.pt``, ``.pth``, ``.bin``, Lightning's ``.ckpt``, anything ``torch.save`` wrote):
  loaded with ``weights_only=True`` and, for the zip format torch has written since 1.6,
  ``mmap=True`` (tensors stay on disk until read; a legacy-format file is loaded whole). The
  state dict is the file itself or the mapping under ``state_dict`` (Lightning), ``model``
  (nanoGPT and many loops), ``model_state_dict`` or ``module`` (DeepSpeed); the file's
  ``global_step`` / ``step`` / ``iter_num`` / ``iteration`` entries are its steps. Tensors that
  share storage (tied weights) are reported as ties;
- ``.safetensors`` files, memory-mapped, each tensor read on its own; a ``step`` or
  ``global_step`` entry of the file's metadata is its step;
- HuggingFace folders (``save_pretrained``, Trainer ``checkpoint-<step>/``): the shards a
  ``*.safetensors.index.json`` or ``pytorch_model.bin.index.json`` names, else
  ``model.safetensors`` or ``pytorch_model.bin``, else the one ``.safetensors`` file beside a
  ``config.json``; ``trainer_state.json``'s ``global_step`` is the step and its
  ``log_history`` entries at that step the scalars. A weights file with HuggingFace's
  name (``model.safetensors``, ``pytorch_model.bin``, their shards and indexes) stands for its
  folder.

Names: torch.compile's ``_orig_mod.`` components are removed (spectra.capture.rules.clean_name)
and so is a ``module.`` prefix that every tensor carries (a DistributedDataParallel state dict),
so names are the plain model's, as the Recorder records them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.capture import rules

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
STEP_KEYS = ("global_step", "step", "iter_num", "iteration")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_HF_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its header describes it: shape and dtype name ("float32", "bfloat16", ...)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint:
    """One open checkpoint. Use as a context manager, or call :meth:`close`.

    path: what was opened (a file or a folder). format: how it was read, for messages and attrs.
    tensors: its floating-point tensors by name, in the file's order.
    ties: groups of names that hold the same tensor (torch files keep tied weights once).
    steps: the step by where it was read ("trainer_state.json", "'global_step' in the file").
    scalars: numbers its trainer logged at that step (trainer_state.json's log_history).
    config: the config.json that describes its model (in its folder), or None.
    mtime: modification time of its weights, seconds since the epoch.
    """

    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    ties: list[tuple[str, ...]] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    config: Path | None = None
    mtime: float = 0.0
    _readers: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict, repr=False)
    _resources: ExitStack = field(default_factory=ExitStack, repr=False)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (its own shape and dtype), on the CPU."""
        if name not in self._readers:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._readers[name]()

    def close(self) -> None:
        """Release the file mappings (reading afterwards is an error)."""
        self._readers.clear()
        self._resources.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open the checkpoint at ``path`` (a file or a HuggingFace folder; module docstring).

    Raises FileNotFoundError if nothing is there, ValueError naming the file if it is not a
    checkpoint this module reads.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.is_file() and _HF_FILE.match(path.name):
        path = path.parent
    if path.is_dir():
        return _folder(path)
    if path.name.endswith(".safetensors"):
        return _safetensors(path, [path], "safetensors")
    return _torch(path, [path], "torch")


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The checkpoints that ``paths`` name: each file or checkpoint folder itself, and a folder
    without weights of its own replaced by its ``checkpoint-<step>`` folders (a Trainer's output
    directory) or, if it has none, by the checkpoint files in it."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint")
        if not path.is_dir():
            found.append(path)
            continue
        folders = sorted(p for p in path.iterdir() if p.is_dir() and _CHECKPOINT_FOLDER.match(p.name))
        own = _weights(path)
        if own and folders:
            raise ValueError(f"{path}: holds a model of its own ({own[0].name}) and "
                             f"{len(folders)} checkpoint-<step> folders; pass "
                             f"{path / 'checkpoint-*'} for the series or {own[0]} for its model")
        if own or _distributed(path) or any(path.glob("adapter_model.*")):
            found.append(path)  # one checkpoint (the unreadable ones say why when opened)
        elif folders:
            found += folders
        else:
            files = sorted(p for p in path.iterdir() if p.is_file()
                           and (p.suffix in TORCH_SUFFIXES or p.suffix == ".safetensors"))
            if not files:
                raise ValueError(f"{path}: no checkpoint in it (no weights file, no "
                                 "checkpoint-<step> folder, no .pt/.pth/.bin/.ckpt/.safetensors file)")
            found += files
    return found


# -- folders -----------------------------------------------------------------------------------

def _folder(path: Path) -> Checkpoint:
    if _distributed(path):
        raise ValueError(f"{path}: a torch.distributed.checkpoint folder (.distcp shards); "
                         "convert it first with torch.distributed.checkpoint.format_utils."
                         "dcp_to_torch_save(folder, 'model.pt')")
    files = _weights(path)
    if not files:
        adapter = [p.name for p in path.glob("adapter_model.*")]
        why = (f"it holds a peft adapter ({adapter[0]}), not a full model: merge the adapter "
               "into its base model and save_pretrained that" if adapter else
               "looked for a *.safetensors.index.json, pytorch_model.bin.index.json, "
               "model.safetensors, pytorch_model.bin, or one .safetensors file beside a "
               "config.json")
        raise ValueError(f"{path}: no model weights in this folder ({why})")
    shards = f" ({len(files)} shards)" if len(files) > 1 else ""
    if files[0].name.endswith(".safetensors"):
        checkpoint = _safetensors(path, files, f"HuggingFace folder, safetensors{shards}")
    else:
        checkpoint = _torch(path, files, f"HuggingFace folder, pytorch_model.bin{shards}")
    state = path / "trainer_state.json"
    if state.exists():
        step, scalars = _trainer_state(state)
        if step is not None:
            checkpoint.steps["trainer_state.json"] = step
        checkpoint.scalars.update(scalars)
    return checkpoint


def _weights(folder: Path) -> list[Path]:
    """The weights files of a HuggingFace folder, or [] if it has none: the shards a weight
    index names, else model.safetensors or pytorch_model.bin, else the one .safetensors file
    beside a config.json."""
    for pattern in ("*.safetensors.index.json", "pytorch_model.bin.index.json"):
        indexes = sorted(folder.glob(pattern))
        if len(indexes) > 1:
            raise ValueError(f"{folder}: several weight indexes {[p.name for p in indexes]}; "
                             "pass the one to import")
        if indexes:
            return _shards(indexes[0])
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    single = [p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_")]
    return single if len(single) == 1 and (folder / "config.json").is_file() else []


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a weight index (no 'weight_map': {exc})") from None
    files = list(dict.fromkeys(index.parent / name for name in weight_map.values()))
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"{index}: names shards that are not there: {missing}")
    return files


def _distributed(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and any(folder.glob("*.distcp"))


def _trainer_state(path: Path) -> tuple[int | None, dict[str, float]]:
    """(global_step, numbers logged at that step) of a Trainer's trainer_state.json."""
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    step = state.get("global_step")
    if not isinstance(step, int):
        return None, {}
    scalars: dict[str, float] = {}
    for entry in state.get("log_history", []):
        if entry.get("step") == step:
            scalars.update({k: float(v) for k, v in entry.items()
                            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)})
    return step, scalars


# -- safetensors -------------------------------------------------------------------------------

def _safetensors(path: Path, files: list[Path], form: str) -> Checkpoint:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise ValueError(f"{files[0]}: reading .safetensors files needs the safetensors "
                         "package (pip install safetensors)") from None

    checkpoint = _new(path, files, form)
    for file in files:
        try:
            handle = checkpoint._resources.enter_context(safe_open(str(file), framework="pt"))
        except (SafetensorError, OSError) as exc:
            checkpoint.close()
            raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None
        for key in handle.keys():
            piece = handle.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is not None:
                checkpoint._readers[key] = (lambda h=handle, k=key: h.get_tensor(k))
                checkpoint.tensors[key] = TensorInfo(tuple(piece.get_shape()), dtype)
        metadata = handle.metadata() or {}
        for key in ("global_step", "step"):
            if str(metadata.get(key, "")).isdigit():
                checkpoint.steps[f"{key!r} in its metadata"] = int(metadata[key])
    return _named(checkpoint)


# -- torch files -------------------------------------------------------------------------------

def _torch(path: Path, files: list[Path], form: str) -> Checkpoint:
    checkpoint = _new(path, files, form)
    by_storage: dict[tuple, list[str]] = {}
    for file in files:
        loaded = _torch_load(file)
        state, under = _state_dict(loaded, file)
        if under is not None:
            checkpoint.format = f"{form}, state dict under {under!r}"
            checkpoint.steps.update(_file_steps(loaded))
        for key, tensor in state.items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                checkpoint._readers[key] = (lambda t=tensor: t)
                checkpoint.tensors[key] = TensorInfo(tuple(tensor.shape),
                                                     str(tensor.dtype).removeprefix("torch."))
                by_storage.setdefault(_storage_key(tensor), []).append(key)
    checkpoint.ties = [tuple(keys) for keys in by_storage.values() if len(keys) > 1]
    return _named(checkpoint)


def _torch_load(file: Path) -> Any:
    """The object in a torch file, its tensors memory-mapped where the format allows."""
    zipped = zipfile.is_zipfile(file)
    with open(file, "rb") as f:
        pickled = f.read(2) == b"\x80\x02"  # torch's legacy format: a protocol-2 pickle
    if not (zipped or pickled):
        raise ValueError(f"{file}: not a torch checkpoint (neither torch.save's zip format nor "
                         "its legacy one), nor a .safetensors file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise ValueError(
                f"{file}: holds pickled Python objects that torch.load(weights_only=True) "
                "refuses (a whole model, custom classes); if you trust the file, load it "
                "yourself and torch.save its model's state_dict() for import") from None
        raise ValueError(f"{file}: not a readable torch checkpoint ({exc})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{file}: not a readable torch checkpoint ({exc})") from None


def _state_dict(loaded: Any, file: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The state dict in a loaded torch file and the key it was under (None: the file itself)."""
    if _is_state_dict(loaded):
        return loaded, None
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(loaded.get(key)):
                return loaded[key], key
    keys = list(loaded)[:12] if isinstance(loaded, Mapping) else type(loaded).__name__
    raise ValueError(f"{file}: no state dict in it (a mapping of names to tensors, at the top or "
                     f"under {list(STATE_DICT_KEYS)}); it holds {keys}")


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) for k in value)
            and all(isinstance(v, torch.Tensor) for k, v in value.items()
                    if not k.endswith("_extra_state")))


def _file_steps(loaded: Mapping[str, Any]) -> dict[str, int]:
    steps = {}
    for key in STEP_KEYS:
        value = loaded.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, int) and not isinstance(value, bool):
            steps[f"{key!r} in the file"] = value
    return steps


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


# -- common ------------------------------------------------------------------------------------

def _new(path: Path, files: list[Path], form: str) -> Checkpoint:
    folder = path if path.is_dir() else path.parent
    return Checkpoint(path=path, format=form, tensors={}, config=_hf_config(folder / "config.json"),
                      mtime=max(f.stat().st_mtime for f in files))


def _hf_config(path: Path) -> Path | None:
    """``path`` if it is a HuggingFace config (a JSON object with a model_type), else None."""
    try:
        config = json.loads(path.read_text())
        return path if isinstance(config, dict) and "model_type" in config else None
    except (OSError, ValueError, TypeError):
        return None


def _named(checkpoint: Checkpoint) -> Checkpoint:
    """Rename the checkpoint's tensors to the plain model's names (module docstring)."""
    keys = list(checkpoint.tensors)
    strip = bool(keys) and all(k.startswith("module.") for k in keys)
    names = {k: rules.clean_name(k.removeprefix("module.") if strip else k) for k in keys}
    if len(set(names.values())) < len(names):
        clash = [k for k in keys if list(names.values()).count(names[k]) > 1]
        raise ValueError(f"{checkpoint.path}: tensors {clash[:4]} have the same name once "
                         "torch.compile's _orig_mod is removed")
    if all(k == n for k, n in names.items()):
        return checkpoint
    checkpoint.tensors = {names[k]: info for k, info in checkpoint.tensors.items()}
    checkpoint._readers = {names[k]: read for k, read in checkpoint._readers.items()}
    checkpoint.ties = [tuple(names[k] for k in tie) for tie in checkpoint.ties]
    return checkpoint
