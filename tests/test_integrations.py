"""Trainers: the Recorder driven by wrapped optimizers (accelerate, Lightning, AMP's GradScaler)
and the Lightning and HF Trainer callbacks, run with the real packages. Weights are compared
bitwise with the test's own copies, taken through the test's own callbacks and hooks; losses
with the trainers' own numbers."""

import threading

import numpy as np
import pytest
import torch
from torch import nn

import spectra
from conftest import analyze_with_defaults
from spectra.capture.recorder import Recorder
from spectra.store import StoreError

accelerate = pytest.importorskip("accelerate")
pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from spectra.integrations.lightning import SpectraCallback as LightningCallback  # noqa: E402
from spectra.integrations.transformers import SpectraCallback as HFCallback  # noqa: E402


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "spectra-writer"]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _copies(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- Recorder(optimizer=...) with trainers' wrappers ---------------------------------------------

def test_recorder_hooks_the_optimizer_inside_accelerate_and_counts_real_steps(tmp_path):
    """accelerate's AcceleratedOptimizer steps its optimizer once per accumulation window."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    copies = {0: _copies(model)}
    optimizer.optimizer.register_step_post_hook(  # the test's own hook, on the real optimizer
        lambda *_: copies.setdefault(len(copies), _copies(model)))
    g = torch.Generator().manual_seed(0)
    try:
        with Recorder(model, tmp_path / "r.zarr", optimizer=optimizer, every=1) as rec:
            for _ in range(6):  # 6 micro-batches = 3 optimizer steps
                with accelerator.accumulate(model):
                    loss = model(torch.randn(4, 6, generator=g)).pow(2).mean()
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                rec.log(loss=loss.item())
        assert len(optimizer.optimizer._optimizer_step_post_hooks) == 1  # only the test's own
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 1, 2, 3])
    assert run.attrs["optimizer"]["name"] == "SGD"
    for t in range(4):
        for name in ("0.weight", "2.weight"):
            np.testing.assert_array_equal(run.weights(name, t), copies[t][name].numpy())


def test_recorder_hooks_the_optimizer_inside_lightnings_wrapper(tmp_path):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = LightningOptimizer(inner)
    with Recorder(model, tmp_path / "r.zarr", optimizer=wrapped, every=1) as rec:
        assert rec.optimizer is inner
        for _ in range(2):  # (LightningOptimizer.step needs a running Trainer: step the inner)
            model(torch.randn(4, 6)).pow(2).mean().backward()
            inner.step()
    assert not inner._optimizer_step_post_hooks
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2])


def test_optimizer_mode_does_not_count_steps_the_grad_scaler_skipped(tmp_path):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with Recorder(model, tmp_path / "r.zarr", optimizer=optimizer, every=1) as rec:
        for k in range(4):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(4, 6)).pow(2).mean()).backward()
            if k == 1:
                model[0].weight.grad[0, 0] = float("inf")  # an overflow: the step is skipped
            scaler.step(optimizer)
            scaler.update()
        assert rec.global_step == 3
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2, 3])


def test_an_object_without_an_optimizer_inside_is_refused(tmp_path):
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or a wrapper "
                                        "holding one .*; got object"):
        Recorder(_mlp(), tmp_path / "r.zarr", optimizer=object())


# -- Lightning -------------------------------------------------------------------------------------

class LitMLP(pl.LightningModule):
    """An MLP that keeps the loss of every batch it trains on."""

    def __init__(self, fail_at_batch=None):
        super().__init__()
        self.net = _mlp()
        self.batch_losses = []
        self.fail_at_batch = fail_at_batch

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise KeyError("boom")
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.batch_losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class OwnLightningCopies(pl.Callback):
    """The test's own copies of the weights at each global step."""

    def __init__(self):
        self.copies = {}

    def on_train_start(self, trainer, module):
        self.copies[trainer.global_step] = _copies(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.copies[trainer.global_step] = _copies(module)


def _loader(n=48):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                          torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _lightning(callbacks, max_steps, **options):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                      **options)


def test_lightning_counts_optimizer_steps_and_stores_each_steps_loss(tmp_path):
    module, own = LitMLP(), OwnLightningCopies()
    callback = LightningCallback(tmp_path / "r.zarr", every=2)
    _lightning([own, callback], max_steps=5, accumulate_grad_batches=3).fit(module, _loader())
    run = spectra.open_run(callback.path)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 5])  # 15 batches, the final weights too
    for t, step in enumerate(run.steps):
        for name in ("net.0.weight", "net.2.weight"):
            np.testing.assert_array_equal(run.weights(name, t), own.copies[int(step)][name].numpy())
    windows = np.array(module.batch_losses).reshape(5, 3).mean(axis=1)  # step k: batches of k
    np.testing.assert_allclose(run.scalars["loss"][1:], windows[[1, 3, 4]], rtol=1e-6)
    np.testing.assert_array_equal(run.scalars["lr"][1:], 0.2)
    config = run.attrs["config"]
    assert config["integration"] == "lightning" and config["accumulate_grad_batches"] == 3
    assert config["optimizer"]["name"] == "SGD"
    assert callback.recorder is None and not _writer_threads()
    analyze_with_defaults(callback.path)


def test_lightning_exception_closes_the_store(tmp_path):
    callback = LightningCallback(tmp_path / "r.zarr", every=1)
    with pytest.raises(KeyError, match="boom"):
        _lightning([callback], max_steps=20).fit(LitMLP(fail_at_batch=4), _loader())
    assert not _writer_threads() and callback.recorder is None
    np.testing.assert_array_equal(spectra.open_run(callback.path).steps, [0, 1, 2, 3, 4])


def test_lightning_resume_from_checkpoint_continues_the_store(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    options = dict(enable_checkpointing=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[saving, LightningCallback(tmp_path / "r.zarr", every=2)],
                         **options)
    trainer.fit(LitMLP(), _loader())
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert checkpoint.exists()
    resumed = LitMLP()
    with torch.no_grad():  # a fresh model: the checkpoint must put it back at step 4
        for p in resumed.parameters():
            p.add_(1.0)
    own = OwnLightningCopies()
    callback = LightningCallback(tmp_path / "r.zarr", every=2)
    _lightning([own, callback], max_steps=6).fit(resumed, _loader(), ckpt_path=checkpoint)
    run = spectra.open_run(callback.path)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    np.testing.assert_array_equal(run.weights("net.0.weight", 3), own.copies[6]["net.0.weight"].numpy())
    assert [r["step"] for r in run.attrs["resumes"]] == [4]


def test_lightning_rewinds_or_overwrites_the_store_only_when_asked(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[saving, LightningCallback(tmp_path / "r.zarr", every=1)])
    trainer.fit(LitMLP(), _loader())
    older = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    with pytest.raises(StoreError, match=r"start_step=2 is not after the last committed step 4"
                       r".*pass rewind=True \(drops 2 snapshot\(s\): steps 3..4\)"):
        _lightning([LightningCallback(tmp_path / "r.zarr", every=1)], max_steps=5).fit(
            LitMLP(), _loader(), ckpt_path=older)
    assert not _writer_threads()
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2, 3, 4])

    own, callback = OwnLightningCopies(), LightningCallback(tmp_path / "r.zarr", every=1,
                                                           rewind=True)
    _lightning([own, callback], max_steps=5).fit(LitMLP(), _loader(), ckpt_path=older)
    run = spectra.open_run(callback.path)
    np.testing.assert_array_equal(run.steps, [0, 1, 2, 3, 4, 5])
    for t in (2, 3, 4, 5):  # step 2 kept, 3..5 recorded again from the older checkpoint
        np.testing.assert_array_equal(run.weights("net.0.weight", t),
                                      own.copies[t]["net.0.weight"].numpy())
    (rewind,) = run.attrs["rewinds"]
    assert (rewind["to_step"], rewind["from_step"], rewind["dropped"]) == (2, 4, 2)

    own, callback = OwnLightningCopies(), LightningCallback(tmp_path / "r.zarr", every=2,
                                                           overwrite=True)
    _lightning([own, callback], max_steps=3).fit(LitMLP(), _loader())
    run = spectra.open_run(callback.path)
    np.testing.assert_array_equal(run.steps, [0, 2, 3])  # a new store: no rewinds, no resumes
    assert "rewinds" not in run.attrs and "resumes" not in run.attrs
    np.testing.assert_array_equal(run.init("net.0.weight"), own.copies[0]["net.0.weight"].numpy())


# -- HF Trainer --------------------------------------------------------------------------------

class OwnHFCopies(transformers.TrainerCallback):
    """The test's own copies of the weights at each global step, and the Trainer's logs."""

    def __init__(self):
        self.copies, self.logs = {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.copies[state.global_step] = _copies(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.copies[state.global_step] = _copies(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs[state.global_step] = logs


class FailAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyError("boom")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _tokens(n=40):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (n, 12), generator=g)]


def _hf(model, tmp_path, callbacks, **options):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                    learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, disable_tqdm=True, seed=0)
    args = transformers.TrainingArguments(**{**defaults, **options})
    return transformers.Trainer(model=model, args=args, train_dataset=_tokens(),
                                callbacks=callbacks)


def _gpt2_expected(copies):
    names = [f"transformer.h.{i}.{p}.weight" for i in range(2)
             for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    expected = {n: (lambda c, n=n: c[n].T) for n in names}
    expected["lm_head.weight"] = lambda c: c["transformer.wte.weight"]
    return expected


def test_hf_trainer_counts_optimizer_steps_and_stores_the_loss_it_logs(tmp_path):
    own, callback = OwnHFCopies(), HFCallback(tmp_path / "r.zarr", every=2)
    _hf(_gpt2(), tmp_path, [own, callback], max_steps=5, gradient_accumulation_steps=2).train()
    run = spectra.open_run(callback.path)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 5])
    expected = _gpt2_expected(own.copies)
    assert run.params == list(expected)
    for t, step in enumerate(run.steps):
        for name, matrix in expected.items():
            np.testing.assert_array_equal(run.weights(name, t),
                                          matrix(own.copies[int(step)]).numpy())
    for t, step in enumerate(run.steps[1:], start=1):
        logs = own.logs[int(step)]
        assert run.scalars["loss"][t] == pytest.approx(logs["loss"], rel=1e-6)
        assert run.scalars["lr"][t] == pytest.approx(logs["learning_rate"], rel=1e-12)
    assert run.attrs["config"]["gradient_accumulation_steps"] == 2
    assert callback.recorder is None and not _writer_threads()
    analyze_with_defaults(callback.path)


def test_hf_trainer_resume_from_checkpoint_continues_the_store(tmp_path):
    _hf(_gpt2(), tmp_path, [HFCallback(tmp_path / "r.zarr", every=2)], max_steps=4,
        save_strategy="steps", save_steps=2).train()
    own, callback = OwnHFCopies(), HFCallback(tmp_path / "r.zarr", every=2)
    model = _gpt2()
    _hf(model, tmp_path, [own, callback], max_steps=6).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    run = spectra.open_run(callback.path)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    np.testing.assert_array_equal(run.weights("lm_head.weight", 3),
                                  own.copies[6]["transformer.wte.weight"].numpy())


def test_hf_trainer_exception_leaves_committed_snapshots_and_close_cleans_up(tmp_path):
    callback = HFCallback(tmp_path / "r.zarr", every=1)
    trainer = _hf(_gpt2(), tmp_path, [FailAt(3), callback], max_steps=6)
    with pytest.raises(KeyError, match="boom"):
        trainer.train()
    callback.close()
    assert not _writer_threads() and callback.recorder is None
    np.testing.assert_array_equal(spectra.open_run(callback.path).steps, [0, 1, 2])


def test_callbacks_refuse_what_the_trainer_decides_and_unknown_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"sets \['start_step'\] from the trainer"):
        HFCallback(tmp_path / "r.zarr", start_step=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'evrey'"):
        LightningCallback(tmp_path / "r.zarr", evrey=3)
