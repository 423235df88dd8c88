import math

import torch

from spectra.tasks.data import CharCorpus, kjv_text, mnist5k, pydoc_text
from spectra.tasks.models import GPT, MLP, GPTConfig


def test_kjv_text_ships_offline_without_verse_numbers():
    text = kjv_text()
    assert text.startswith("In the beginning God created the heaven")
    assert 4_000_000 < len(text) < 4_400_000
    assert not any(line[:1].isdigit() and ":" in line[:8] for line in text.splitlines()[:1000])


def test_char_corpus_batches_are_next_character_targets():
    corpus = CharCorpus(pydoc_text()[:20000], val_fraction=0.25)
    assert corpus.decode(corpus.encode("abc")) == "abc"
    assert len(corpus.splits["val"]) == 20000 - int(20000 * 0.75)
    x, y = corpus.batch("train", 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_mnist5k_split():
    data = mnist5k(seed=1)
    assert data.x_train.shape == (4000, 784) and data.x_test.shape == (1000, 784)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert data.num_classes == 10 and set(data.y_test.tolist()) == set(range(10))


def test_gpt_starts_near_uniform_prediction():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    ids = torch.randint(0, 50, (4, 16))
    logits, loss = model(ids, ids)
    assert logits.shape == (4, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.05


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 20, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 20
    torch.testing.assert_close(model(ids)[:, :-1], model(changed)[:, :-1])


def test_mlp_shapes():
    assert MLP((10, 7, 3))(torch.zeros(5, 10)).shape == (5, 3)
