"""spectra.import_checkpoints and `spectra import`: stores made from checkpoints that torch.save,
safetensors, transformers (save_pretrained, Trainer) and Lightning wrote, checked against the
checkpoints' own tensors (read by the test with torch / safetensors, transformers' Conv1D
transposed by the test) and against stores the Recorder recorded live at the same steps."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spectra
from conftest import TinyNet, train_steps
from spectra.capture.checkpoints.steps import name_steps
from spectra.capture.recorder import Recorder
from spectra.cli import main
from spectra.store import StoreError

REPO = Path(__file__).resolve().parents[1]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _as_stored(state, name, transposed=False):
    """The test's own (out, in) matrix of a checkpoint tensor."""
    t = state[name].float()
    return (t.T if transposed else t.reshape(t.shape[0], -1)).numpy()


def _tiny_series(folder, steps, name="step_{}.pt", freeze=()):
    """Train TinyNet, torch.save its state dict at ``steps``; the test's copies by step."""
    torch.manual_seed(0)
    model = TinyNet()
    for module in freeze:
        getattr(model, module).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}

    def keep(k, loss=None):
        if k in steps:
            saved[k] = {n: t.detach().clone() for n, t in model.state_dict().items()}
            torch.save(saved[k], folder / name.format(k))

    keep(0)
    train_steps(model, opt, max(steps), torch.Generator().manual_seed(0), keep)
    return saved


def _meta_tinynet():
    with torch.device("meta"):
        return TinyNet()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40,
                                      n_positions=16, bos_token_id=0, eos_token_id=0))


def _train_hf(model, steps, after_step):
    """AdamW steps on random token batches; after_step(k) after the k-th."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for k in range(1, steps + 1):
        ids = torch.randint(0, 40, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(k)


def _assert_same_store(live, imported):
    assert imported.params == live.params
    np.testing.assert_array_equal(imported.steps, live.steps)
    for name in live.params:
        a, b = live.spec(name), imported.spec(name)
        assert (b.shape, b.original_shape, b.kind, b.dtype, dict(b.attrs)) == \
               (a.shape, a.original_shape, a.kind, a.dtype, dict(a.attrs)), name
        np.testing.assert_array_equal(imported.weights(name), live.weights(name))


def test_spectra_exports_the_importer_lazily():
    from spectra.capture.checkpoints.importer import import_checkpoints
    assert spectra.import_checkpoints is import_checkpoints
    assert "import_checkpoints" in spectra.__all__


# -- formats -------------------------------------------------------------------------------

def test_torch_state_dicts_import_bitwise_in_step_order(tmp_path):
    saved = _tiny_series(tmp_path / "ckpt", (0, 3, 6))
    given = sorted((tmp_path / "ckpt").glob("*.pt"), reverse=True)  # out of order
    run = spectra.import_checkpoints(given, tmp_path / "r.zarr", quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 3, 6])
    # no model class: every tensor as saved, the embedding table cannot be told from a map
    assert run.params == ["emb.weight", "conv.weight", "fc1.weight", "fc2.weight"]
    assert {run.kind(n) for n in run.params} == {"matrix"}
    assert "no model class" in run.attrs["import"]["orientation"]
    for row, step in enumerate(run.steps):
        for name in run.params:
            np.testing.assert_array_equal(run.weights(name, row), _as_stored(saved[step], name))

    typed = spectra.import_checkpoints(given, tmp_path / "m.zarr", model=_meta_tinynet(), quiet=True)
    assert typed.params == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert [typed.kind(n) for n in typed.params] == ["conv", "linear", "linear"]
    assert typed.attrs["import"]["orientation"] == "TinyNet given as model="
    np.testing.assert_array_equal(typed.weights("conv.weight", 2), _as_stored(saved[6], "conv.weight"))


def test_an_import_creates_atomically_and_gives_the_store_back_when_done_or_failed(tmp_path,
                                                                                  monkeypatch):
    from spectra.store import StoreLock, StoreLocked
    from spectra.store.lock import read_holder
    _tiny_series(tmp_path / "ckpt", (0, 3, 6))
    files = sorted((tmp_path / "ckpt").glob("*.pt"))
    store = tmp_path / "r.zarr"
    spectra.import_checkpoints(files[:2], store, quiet=True)
    assert "released_unix" in read_holder(store)  # closed: the writer lock is free
    assert not list(tmp_path.glob(".r.zarr.*"))  # built aside, renamed into place
    with StoreLock(store):  # a Recorder holding the store: the import is refused, unchanged
        with pytest.raises(StoreLocked, match=f"held by process {os.getpid()}"):
            spectra.import_checkpoints(files, store, quiet=True)
    np.testing.assert_array_equal(spectra.open_run(store).steps, [0, 3])
    monkeypatch.setattr(spectra.store.RunWriter, "append", _fail)
    with pytest.raises(ValueError, match="disk full; .* keeps its 2 committed snapshots"):
        spectra.import_checkpoints(files, store, quiet=True)
    assert "released_unix" in read_holder(store)
    monkeypatch.undo()
    np.testing.assert_array_equal(spectra.import_checkpoints(files, store, quiet=True).steps,
                                  [0, 3, 6])


def _fail(*args, **kwargs):
    raise OSError("disk full")


def test_nested_state_dicts_take_steps_from_their_metadata_and_lose_wrapper_prefixes(tmp_path):
    saved = _tiny_series(tmp_path / "plain", (0, 2, 4))
    folder = tmp_path / "nested"
    folder.mkdir()
    for k, letter in zip((0, 2, 4), "abc"):
        wrapped = {f"module._orig_mod.{n}": t for n, t in saved[k].items()}  # DDP(compile(m))
        torch.save({"model": wrapped, "optimizer": {"state": {}}, "iter_num": k,
                    "config": {"lr": 0.1}}, folder / f"run-{letter}.pt")
    torch.save({"state_dict": saved[4], "global_step": 6, "epoch": 0}, folder / "last.ckpt")
    run = spectra.import_checkpoints(folder, tmp_path / "r.zarr", model=_meta_tinynet(), quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    assert run.params == ["conv.weight", "fc1.weight", "fc2.weight"]
    formats = [c["format"] for c in run.attrs["import"]["checkpoints"]]
    assert formats[0] == "torch, state dict under 'model'" and "'state_dict'" in formats[-1]
    np.testing.assert_array_equal(run.weights("fc1.weight", 3), _as_stored(saved[4], "fc1.weight"))

    torch.save({"model": saved[2], "step": 5}, tmp_path / "step_3.pt")
    with pytest.raises(ValueError, match=r"its steps disagree \(its name \(step_3\) says 3; "
                                         r"'step' in the file says 5\); pass the steps"):
        spectra.import_checkpoints(tmp_path / "step_3.pt", tmp_path / "x.zarr", quiet=True)


def test_safetensors_files_keep_bfloat16_weights_exactly(tmp_path):
    from safetensors.torch import save_file
    saved = _tiny_series(tmp_path / "pt", (0, 2, 4))
    (tmp_path / "st").mkdir()
    for k, state in saved.items():
        save_file({n: t.to(torch.bfloat16).contiguous() for n, t in state.items()},
                  tmp_path / "st" / f"model_{k:06d}.safetensors", metadata={"format": "pt"})
    run = spectra.import_checkpoints(tmp_path / "st", tmp_path / "r.zarr", model=_meta_tinynet(),
                                     quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    assert run.spec("fc1.weight").dtype == "bfloat16"
    for row, step in enumerate(run.steps):
        for name in run.params:
            expected = saved[step][name].to(torch.bfloat16).float()
            np.testing.assert_array_equal(run.weights(name, row), _as_stored({name: expected}, name))


def test_a_folder_of_pytorch_model_bin_shards_is_one_checkpoint(tmp_path):
    saved = _tiny_series(tmp_path / "plain", (0, 5))
    for k, state in saved.items():
        folder = tmp_path / f"checkpoint-{k}"
        folder.mkdir()
        names = list(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[:4],
                  "pytorch_model-00002-of-00002.bin": names[4:]}
        for file, part in shards.items():
            torch.save({n: state[n] for n in part}, folder / file)
        index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    run = spectra.import_checkpoints([tmp_path / "checkpoint-5", tmp_path / "checkpoint-0"],
                                     tmp_path / "r.zarr", model=_meta_tinynet(), quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 5])
    assert run.attrs["import"]["checkpoints"][0]["format"] == \
        "HuggingFace folder, pytorch_model.bin (2 shards)"
    for row, step in enumerate(run.steps):
        for name in run.params:
            np.testing.assert_array_equal(run.weights(name, row), _as_stored(saved[step], name))


def test_huggingface_folders_plain_sharded_and_bin_give_conv1d_transposed(tmp_path):
    model = _gpt2()
    out, copies = tmp_path / "out", {}

    def save(k):
        if k % 2:
            return
        folder = out / f"checkpoint-{k}"
        copies[k] = {n: t.detach().clone() for n, t in model.state_dict().items()}
        if k == 0:
            model.save_pretrained(folder)
        elif k == 2:
            model.save_pretrained(folder, max_shard_size="20KB")
        else:  # the older transformers layout: pytorch_model.bin beside config.json
            model.config.save_pretrained(folder)
            torch.save(model.state_dict(), folder / "pytorch_model.bin")

    save(0)
    _train_hf(model, 4, save)
    assert (out / "checkpoint-2" / "model.safetensors.index.json").exists()
    run = spectra.import_checkpoints(out, tmp_path / "r.zarr", quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    conv1d = [f"transformer.h.{i}.{m}" for i in range(2) for m in CONV1D]
    assert run.params == conv1d + ["lm_head.weight"]
    assert run.attrs["import"]["orientation"] == \
        f"GPT2LMHeadModel built from {out / 'checkpoint-0' / 'config.json'}"
    head = run.spec("lm_head.weight")
    assert head.kind == "linear" and head.attrs["tied_to"] == ["transformer.wte.weight"]
    assert "transposed" in run.spec(conv1d[0]).attrs["layout"]
    for row, step in enumerate(run.steps):
        for name in conv1d:
            np.testing.assert_array_equal(run.weights(name, row),
                                          _as_stored(copies[step], name, transposed=True))
        np.testing.assert_array_equal(run.weights("lm_head.weight", row),
                                      _as_stored(copies[step], "transformer.wte.weight"))
    assert [c["format"] for c in run.attrs["import"]["checkpoints"]] == [
        "HuggingFace folder, safetensors", f"HuggingFace folder, safetensors "
        f"({len(list((out / 'checkpoint-2').glob('*.safetensors')))} shards)",
        "HuggingFace folder, pytorch_model.bin"]


def test_a_checkpoint_holding_both_names_of_a_tie_is_read_as_untied(tmp_path):
    from safetensors.torch import save_file
    model = _gpt2()  # its config ties lm_head to wte
    state = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0  # fine-tuned apart
    for k in (0, 1):
        folder = tmp_path / f"checkpoint-{k}"
        model.config.save_pretrained(folder)
        save_file({n: t + k for n, t in state.items()}, folder / "model.safetensors")
    run = spectra.import_checkpoints([tmp_path / "checkpoint-0", tmp_path / "checkpoint-1"],
                                     tmp_path / "r.zarr", quiet=True)
    assert "tied_to" not in run.spec("lm_head.weight").attrs
    np.testing.assert_array_equal(run.weights("lm_head.weight", 1),
                                  (state["lm_head.weight"] + 1).numpy())


@pytest.mark.slow
def test_trainer_checkpoints_of_a_llama_with_steps_and_losses_from_trainer_state(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=40, max_position_embeddings=16, bos_token_id=0,
        eos_token_id=0))
    out = tmp_path / "out"
    model.save_pretrained(out / "checkpoint-0")
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 40, (16, 16), generator=gen)]
    args = TrainingArguments(str(out), max_steps=4, save_steps=2, save_strategy="steps",
                             logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()

    run = spectra.import_checkpoints(out, tmp_path / "r.zarr", quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    assert len(run.params) == 2 * 7 + 1 and run.params[-1] == "lm_head.weight"
    assert "model.embed_tokens.weight" not in run.params
    for row, step in enumerate(run.steps):
        with safe_open(str(out / f"checkpoint-{step}" / "model.safetensors"), "pt") as f:
            for name in run.params:
                np.testing.assert_array_equal(run.weights(name, row), f.get_tensor(name).numpy())
    log = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"]: entry["loss"] for entry in log if "loss" in entry}
    assert np.isnan(run.scalars["loss"][0])
    np.testing.assert_array_equal(run.scalars["loss"][1:], [losses[2], losses[4]])
    assert [c["step_from"] for c in run.attrs["import"]["checkpoints"]] == [
        "its name (checkpoint-0)", "its name (checkpoint-2)", "its name (checkpoint-4)"]


@pytest.mark.slow
def test_lightning_checkpoints_of_a_gpt2_with_a_model_config(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _gpt2()

        def training_step(self, ids, index):
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = Module()
    module.model.config.save_pretrained(tmp_path / "config")
    ids = torch.randint(0, 40, (16, 16), generator=torch.Generator().manual_seed(0))
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2,
                                         save_top_k=-1)
    trainer = pl.Trainer(max_steps=4, callbacks=[saver], logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=4))

    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [f.name for f in files] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    run = spectra.import_checkpoints(files, tmp_path / "r.zarr", model_config=tmp_path / "config",
                                     quiet=True)
    np.testing.assert_array_equal(run.steps, [2, 4])
    assert run.attrs["import"]["orientation"].startswith(
        f"GPT2LMHeadModel built from {tmp_path / 'config' / 'config.json'} (the config names no "
        "architecture")  # saved from model.config alone: the head is found from the tensors
    conv1d = [f"model.transformer.h.{i}.{m}" for i in range(2) for m in CONV1D]
    assert run.params == conv1d + ["model.lm_head.weight"]
    for row, file in enumerate(files):
        state = torch.load(file, weights_only=True)["state_dict"]
        for name in conv1d:
            np.testing.assert_array_equal(run.weights(name, row), _as_stored(state, name, True))
        np.testing.assert_array_equal(run.weights("model.lm_head.weight", row),
                                      _as_stored(state, "model.lm_head.weight"))


# -- the same store as recording live ------------------------------------------------------

def test_imported_gpt2_store_equals_the_store_recorded_live(tmp_path):
    model = _gpt2()
    with Recorder(model, tmp_path / "live.zarr", every=2) as rec:
        model.save_pretrained(tmp_path / "out" / "checkpoint-0")

        def step(k):
            rec.step()
            if k % 2 == 0:
                model.save_pretrained(tmp_path / "out" / f"checkpoint-{k}")

        _train_hf(model, 6, step)
    imported = spectra.import_checkpoints(tmp_path / "out", tmp_path / "imported.zarr", quiet=True)
    _assert_same_store(spectra.open_run(tmp_path / "live.zarr"), imported)


def test_imported_store_with_a_frozen_layer_equals_the_live_one(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with Recorder(model, tmp_path / "live.zarr", every=3) as rec:
        torch.save(model.state_dict(), folder / "step_0.pt")

        def step(k, loss):
            if rec.step():
                torch.save(model.state_dict(), folder / f"step_{k}.pt")

        train_steps(model, opt, 9, torch.Generator().manual_seed(0), step)
    imported = spectra.import_checkpoints(folder, tmp_path / "imported.zarr",
                                          model=_meta_tinynet(), quiet=True)
    _assert_same_store(spectra.open_run(tmp_path / "live.zarr"), imported)
    assert imported.attrs["import"]["frozen"] == ["fc1.weight"]

    everything = spectra.import_checkpoints(folder, tmp_path / "all.zarr", model=_meta_tinynet(),
                                            trainable_only=False, quiet=True)
    assert everything.params == ["conv.weight", "fc1.weight", "fc2.weight"]
    np.testing.assert_array_equal(everything.updates("fc1.weight"), 0.0)


# -- appending, steps, errors --------------------------------------------------------------

def test_appending_continues_a_store_and_a_rerun_skips_what_it_holds(tmp_path):
    saved = _tiny_series(tmp_path / "ckpt", (0, 2, 4, 6))
    files = [tmp_path / "ckpt" / f"step_{k}.pt" for k in (0, 2, 4, 6)]
    store, arch = tmp_path / "r.zarr", _meta_tinynet()
    spectra.import_checkpoints(files[:2], store, model=arch, quiet=True)
    run = spectra.import_checkpoints(files, store, model=arch, quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    np.testing.assert_array_equal(run.init("fc2.weight"), _as_stored(saved[0], "fc2.weight"))
    np.testing.assert_array_equal(run.weights("fc2.weight", 3), _as_stored(saved[6], "fc2.weight"))
    assert [c["step"] for c in run.attrs["import"]["checkpoints"]] == [0, 2, 4, 6]
    assert len(spectra.import_checkpoints(files, store, model=arch, quiet=True)) == 4

    other = tmp_path / "other"
    other.mkdir()
    torch.save({**saved[2], "conv.weight": saved[4]["conv.weight"]}, other / "step_2.pt")
    with pytest.raises(StoreError, match="step 2 is in .* already, but its 'conv.weight' differs"):
        spectra.import_checkpoints(other / "step_2.pt", store, model=arch, quiet=True)
    torch.save(saved[6], other / "step_5.pt")
    with pytest.raises(StoreError, match="step 5 .* is not after the last step 6"):
        spectra.import_checkpoints(other / "step_5.pt", store, model=arch, quiet=True)
    wider = nn.Linear(6, 9), nn.Linear(9, 5)
    torch.save({**saved[6], "fc1.weight": wider[0].weight, "fc2.weight": wider[1].weight},
               other / "step_8.pt")
    with pytest.raises(StoreError, match=r"has other shapes: \['fc1.weight \(9, 6\) \(stored "
                                         r"\(8, 6\)\)', 'fc2.weight \(5, 9\) \(stored \(5, 8\)\)'\]"):
        spectra.import_checkpoints(other / "step_8.pt", store, model=arch, quiet=True)
    torch.save(saved[6], other / "step_7.pt")
    with pytest.raises(StoreError, match="reads .* with orientation 'as saved"):
        spectra.import_checkpoints(other / "step_7.pt", store, quiet=True)  # no model class
    with pytest.raises(ValueError, match="leave out \\['embeddings=True'\\]"):
        spectra.import_checkpoints(files, store, model=arch, embeddings=True, quiet=True)
    assert len(spectra.open_run(store)) == 4


def test_an_interrupted_import_keeps_its_snapshots_and_the_same_command_finishes_it(tmp_path,
                                                                                 monkeypatch):
    from spectra.capture.checkpoints.sources import Checkpoint
    _tiny_series(tmp_path / "ckpt", (0, 1, 2, 3, 4))
    clean = spectra.import_checkpoints(tmp_path / "ckpt", tmp_path / "clean.zarr", quiet=True)
    read, calls = Checkpoint.read, []

    def interrupted(self, name):  # Ctrl-C while step 3's second matrix is read
        if self.path.name == "step_3.pt":
            calls.append(name)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return read(self, name)

    monkeypatch.setattr(Checkpoint, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        spectra.import_checkpoints(tmp_path / "ckpt", tmp_path / "r.zarr", quiet=True)
    monkeypatch.setattr(Checkpoint, "read", read)
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2])
    _assert_same_store(clean, spectra.import_checkpoints(tmp_path / "ckpt", tmp_path / "r.zarr",
                                                         quiet=True))


def test_a_checkpoint_with_other_matrices_stops_the_import_before_anything_is_written(tmp_path):
    _tiny_series(tmp_path / "ckpt", (0, 2))
    state = torch.load(tmp_path / "ckpt" / "step_2.pt", weights_only=True)
    del state["fc2.weight"]
    state["fc3.weight"] = torch.zeros(5, 8)
    torch.save(state, tmp_path / "ckpt" / "step_2.pt")
    with pytest.raises(StoreError, match=r"step_2.pt: its matrices differ from W_0's: lacks "
                                         r"\['fc2.weight'\]; has \['fc3.weight'\] besides"):
        spectra.import_checkpoints(tmp_path / "ckpt", tmp_path / "r.zarr", quiet=True)
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("name, step", [
    ("checkpoint-500", 500), ("epoch=2-step=1200.ckpt", 1200), ("model_000300.pt", 300),
    ("global_step40", 40), ("iter_70.pth", 70), ("1000.safetensors", 1000),
    ("epoch_3.pt", None), ("resnet50.pt", None), ("last.ckpt", None)])
def test_steps_from_names(tmp_path, name, step):
    assert set(name_steps(tmp_path / name).values()) == ({step} if step is not None else set())


def test_steps_given_or_missing_or_shared_and_an_explicit_init(tmp_path):
    saved = _tiny_series(tmp_path / "ckpt", (0, 1, 2), name="weights-{}.pt")
    for k in (0, 1, 2):
        torch.save(saved[k], tmp_path / f"run-{'abc'[k]}.pt")
    named = [tmp_path / f"run-{x}.pt" for x in "abc"]
    with pytest.raises(ValueError, match=r"cannot tell the step of 3 checkpoint\(s\).*--steps 0,500"):
        spectra.import_checkpoints(named, tmp_path / "r.zarr", quiet=True)
    run = spectra.import_checkpoints(named, tmp_path / "r.zarr", steps=[20, 0, 10], quiet=True)
    np.testing.assert_array_equal(run.steps, [0, 10, 20])
    np.testing.assert_array_equal(run.weights("fc1.weight", 0), _as_stored(saved[1], "fc1.weight"))
    with pytest.raises(ValueError, match="steps: 2 given for 3 checkpoints"):
        spectra.import_checkpoints(named, tmp_path / "x.zarr", steps=[1, 2], quiet=True)
    torch.save(saved[2], tmp_path / "ckpt" / "step_1.pt")
    with pytest.raises(ValueError, match="are both at step 1"):
        spectra.import_checkpoints(tmp_path / "ckpt", tmp_path / "x.zarr", quiet=True)

    init = spectra.import_checkpoints([tmp_path / "ckpt" / "weights-1.pt"], tmp_path / "i.zarr",
                                      init=named[0], quiet=True)
    np.testing.assert_array_equal(init.steps, [0, 1])
    np.testing.assert_array_equal(init.init("fc1.weight"), _as_stored(saved[0], "fc1.weight"))


def test_what_cannot_be_imported_is_a_one_line_error_naming_it(tmp_path):
    torch.save(nn.Linear(2, 3), tmp_path / "whole-model.pt")  # a pickled module, not weights
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    both = tmp_path / "out"
    (both / "checkpoint-2").mkdir(parents=True)
    torch.save(TinyNet().state_dict(), both / "pytorch_model.bin")
    cases = [(tmp_path / "whole-model.pt", r"whole-model.pt: holds pickled Python objects that "
                                           r"torch.load\(weights_only=True\) refuses"),
             (tmp_path / "notes.pt", r"notes.pt: not a torch checkpoint \(neither torch.save.s zip format"),
             (adapter, r"adapter: no model weights in this folder \(it holds a peft adapter"),
             (both, r"out: holds a model of its own \(pytorch_model.bin\) and 1 checkpoint-<step> "
                    r"folders; pass .*checkpoint-\* for the series"),
             (tmp_path / "absent.pt", r"absent.pt: no such checkpoint")]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            spectra.import_checkpoints(path, tmp_path / "r.zarr", steps=[1], quiet=True)
    assert not (tmp_path / "r.zarr").exists()


def test_cli_import_reports_and_refuses_bad_input_without_a_traceback(tmp_path, capsys):
    _tiny_series(tmp_path / "ckpt", (0, 2, 4))
    store = str(tmp_path / "r.zarr")
    assert main(["import", str(tmp_path / "ckpt"), "-o", store, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"imported 3 checkpoint(s) into {store}: steps 0, 2, 4" in out
    assert "orientation: as saved" in out and "4 matrices" in out
    assert main(["import", str(tmp_path / "ckpt"), "-o", store, "--quiet"]) == 0
    assert "nothing to import: the 3 checkpoint(s) are in" in capsys.readouterr().out

    for argv in (["import", str(tmp_path / "missing.pt"), "-o", store],
                 ["import", str(tmp_path / "ckpt"), "-o", str(tmp_path / "x.zarr"), "--steps", "1,2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("spectra import: error: ") and err.count("\n") == 1


# -- memory, the example -------------------------------------------------------------------

_CHILD = """
import sys
import spectra
files, store = sys.argv[1:-1], sys.argv[-1]
spectra.import_checkpoints(files, store, quiet=True)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""  # VmHWM: this process's peak RSS (ru_maxrss would count the parent's RSS at fork too)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_checkpoints(tmp_path):
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(512, 1024, generator=gen) for i in range(2)}
    checkpoint_kb = sum(t.numel() * 4 for t in base.values()) // 1024  # 4 MB
    n = 2
    for k in range(4 * n):
        state = {name: w + 0.01 * k for name, w in base.items()}
        save_file(state, tmp_path / f"step_{k}.safetensors")
        torch.save(state, tmp_path / f"step_{k}.pt")
    # Fixed malloc mmap threshold: freed matrices go back to the OS, so the peak RSS is what the
    # importer holds, not what glibc keeps cached after a free (its dynamic threshold).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}

    def peak_kb(count, suffix):
        paths = [str(tmp_path / f"step_{k}{suffix}") for k in range(count)]
        store = str(tmp_path / f"{suffix[1:]}-{count}.zarr")
        out = subprocess.run([sys.executable, "-c", _CHILD, *paths, store], env=env,
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    for suffix in (".safetensors", ".pt"):
        few, many = peak_kb(n, suffix), peak_kb(4 * n, suffix)
        assert many - few < checkpoint_kb / 2, (suffix, few, many)


@pytest.mark.slow
def test_the_readme_example_saves_trainer_checkpoints_and_imports_them(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("example", REPO / "examples" / "import_checkpoints.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--out", str(tmp_path), "--steps", "4", "--save-every", "2", "--width", "16",
                  "--block", "16", "--quiet"])
    run = spectra.open_run(tmp_path / "run.zarr")
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    assert "lm_head.weight" in run.params and "effective rank" in capsys.readouterr().out
