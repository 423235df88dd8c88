"""Record a Lightning run: a small CNN on scikit-learn's 8×8 digits, every weight matrix
snapshotted into a spectra store by ``SpectraCallback``.

    python examples/lightning_callback.py [--out runs/lightning-cnn.zarr] [--epochs 5]
                                          [--devices 2] [--tiny]

Needs ``pip install "spectra-dynamics[integrations,demo]"``. ``--devices 2`` trains with DDP on
two CPU processes (rank 0 writes the store). With --tiny: a few steps (what CI runs).
"""

import argparse
import shutil

import lightning.pytorch as pl
import torch
from torch import nn

import spectra
from spectra.integrations.lightning import SpectraCallback
from spectra.tasks.data import digits


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightning-cnn.zarr")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1, help=">1: DDP on CPU processes")
    parser.add_argument("--tiny", action="store_true", help="a few optimizer steps")
    args = parser.parse_args()
    data = digits()
    images = torch.utils.data.TensorDataset(data.x_train.view(-1, 1, 8, 8), data.y_train)
    loader = torch.utils.data.DataLoader(images, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    callback = SpectraCallback(args.out, every=5)  # the Recorder's arguments
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, max_epochs=args.epochs,
                         max_steps=8 if args.tiny else -1, accumulate_grad_batches=2,
                         callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=not args.tiny, enable_model_summary=False)
    if trainer.is_global_zero:
        shutil.rmtree(args.out, ignore_errors=True)
    trainer.fit(DigitsCNN(), loader)

    if trainer.is_global_zero:
        run = spectra.open_run(callback.path)
        print(run)  # steps are optimizer steps: one per 2 batches here
        frame = spectra.analyze(run, quiet=True)
        print(frame[(frame.step == run.steps[-1]) & (frame.metric == "stable_rank")]
              .pivot(index="param", columns="target", values="value").to_string())


if __name__ == "__main__":
    main()
