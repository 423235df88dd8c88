"""The demo tasks' loops and recorded runs: thread count, every method on every task."""

import math

import pytest
import torch

import spectra
from spectra.core.threads import torch_threads
from spectra.methods.registry import METHODS
from spectra.tasks.data import CharCorpus, digits, pydoc_text
from spectra.tasks.loops import ClassifierTraining, GPTTraining, train_char_gpt, train_classifier
from spectra.tasks.models import GPT, MLP, GPTConfig
from spectra.tasks.runs import gpt_run, mlp_run


@pytest.fixture
def two_threads():
    """torch at 2 threads during the test (a caller's own choice), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _classifier_threads(**kwargs):
    """The thread counts torch had at each step of a short digits run."""
    seen = []
    torch.manual_seed(0)
    train_classifier(MLP((64, 16, 10)), digits(), ClassifierTraining(epochs=1, batch_size=500),
                     quiet=True, after_step=lambda step, loss: seen.append(torch.get_num_threads()),
                     **kwargs)
    return seen


def test_loops_train_at_one_thread_and_give_the_callers_count_back(two_threads):
    assert _classifier_threads() == [1, 1, 1]
    assert torch.get_num_threads() == 2
    assert _classifier_threads(threads=None) == [2, 2, 2]  # None: torch's setting as it is
    assert _classifier_threads(threads=3) == [3, 3, 3]
    assert torch.get_num_threads() == 2
    corpus = CharCorpus(pydoc_text())
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, block_size=16, n_layer=1, n_head=2,
                          n_embd=16))
    seen = []
    train_char_gpt(model, corpus, GPTTraining(steps=2, batch_size=4, eval_every=2, eval_batches=1),
                   quiet=True, after_step=lambda step, loss: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and torch.get_num_threads() == 2


def test_the_thread_count_is_given_back_after_an_error(two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"threads={bad!r}"):
            with torch_threads(bad):
                pass


def test_inrank_on_the_mlp_converts_the_hidden_layers(tmp_path):
    result = mlp_run("inrank", tmp_path / "run.zarr", quiet=True, every=20,
                     training=ClassifierTraining(epochs=1))
    assert {k for k in result.scalars if k.startswith("rank.")} == {"rank.layers.0",
                                                                   "rank.layers.1"}
    assert spectra.open_run(tmp_path / "run.zarr").attrs["config"]["options"] == {
        "layers": "layers.0,layers.1"}
    with pytest.raises(ValueError, match="matches no nn.Linear"):  # an explicit choice is kept
        mlp_run("inrank", tmp_path / "other.zarr", quiet=True, options={"layers": "*mlp.*"},
                training=ClassifierTraining(epochs=1))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gpt", "mlp"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_every_task(tmp_path, method, task):
    path = tmp_path / "run.zarr"
    if task == "gpt":
        result = gpt_run(method, path, quiet=True,
                         training=GPTTraining(steps=6, eval_every=6, eval_batches=1))
        score, steps = result.final["val_bpc"], 6
    else:
        result = mlp_run(method, path, quiet=True, every=21, training=ClassifierTraining(epochs=1))
        score, steps = result.final["test_accuracy"], 63
    run = spectra.open_run(path)
    assert run.steps[-1] == steps and math.isfinite(score)
    assert result.scalars["trainable_params"] > 0
