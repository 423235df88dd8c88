import pytest
import torch

from spectra.core.threads import torch_threads
from torch import nn


class TinyNet(nn.Module):
    """A conv layer, two linears and an embedding: the shapes the store must handle."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, ids, images):
        h = self.emb(ids).mean(dim=1) + self.conv(images).mean(dim=(2, 3)).repeat(1, 2)
        return self.fc2(torch.relu(self.fc1(h)))


def tiny_batch(generator):
    ids = torch.randint(0, 11, (4, 5), generator=generator)
    images = torch.randn(4, 2, 6, 6, generator=generator)
    target = torch.randn(4, 5, generator=generator)
    return ids, images, target


def train_steps(model, optimizer, steps, generator, on_step=None):
    """Run ``steps`` SGD steps; call on_step(k, loss) after the k-th (1-based)."""
    for k in range(1, steps + 1):
        ids, images, target = tiny_batch(generator)
        loss = (model(ids, images) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(k, loss.item())


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyNet()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator().manual_seed(0)


def analyze_with_defaults(path):
    """spectra.analyze() with its defaults on the store at ``path`` (k clamped per matrix by
    analyze itself); checks every recorded matrix is in the frame, with k ≤ its smaller side,
    and returns the frame."""
    import spectra

    run = spectra.open_run(path)
    frame = spectra.analyze(path, quiet=True)
    assert set(frame["param"].unique()) == set(run.params)
    assert all(frame.attrs["k"][p] <= min(run.shape(p)) for p in run.params)
    return frame


@pytest.fixture
def one_thread():
    """Tiny models: two threads on a busy 2-core machine made such tests 40× slower."""
    with torch_threads(1):
        yield
