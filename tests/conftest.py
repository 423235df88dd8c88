import pytest
import torch
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


@pytest.fixture
def one_thread():
    """Tiny models: two threads on a busy 2-core machine made such tests 40× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
