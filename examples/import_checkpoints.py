"""Analyze checkpoints you already have: a HuggingFace Trainer saves a small GPT-2's
checkpoint-<step>/ folders, spectra imports them into a run store and measures it.

    python examples/import_checkpoints.py
    python examples/import_checkpoints.py --steps 4 --save-every 2 --width 16   # a tiny run

The same import from a shell, once the checkpoints exist:

    spectra import runs/example-import/checkpoints -o runs/example-import/run.zarr
    spectra analyze runs/example-import/run.zarr

Needs transformers (and accelerate, which its Trainer uses). The text is the Python
documentation's topics shipped with the standard library (pydoc_data), read as bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import spectra


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=256, n_positions=args.block, n_embd=args.width, n_layer=2,
                        n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    checkpoints = args.out / "checkpoints"
    model.save_pretrained(checkpoints / "checkpoint-0")  # W_0: the weights before training
    training = TrainingArguments(
        output_dir=str(checkpoints), max_steps=args.steps, save_steps=args.save_every,
        save_strategy="steps", logging_steps=args.save_every, learning_rate=3e-3,
        per_device_train_batch_size=16, report_to=[], use_cpu=True, seed=args.seed,
        disable_tqdm=args.quiet)
    Trainer(model=model, args=training, train_dataset=_text_blocks(args.block)).train()

    run = spectra.import_checkpoints(checkpoints, args.out / "run.zarr", quiet=args.quiet)
    print(f"{run}\n  orientation: {run.attrs['import']['orientation']}")
    frame = spectra.analyze(run.path, k=4, quiet=args.quiet)
    ranks = frame.query("metric == 'effective_rank' and target == 'updates'")
    table = ranks.pivot_table(index="param", columns="step", values="value", observed=True,
                              sort=False)
    print("effective rank of W_t - W_0, by matrix (rows) and step (columns):")
    print(table.drop(columns=0).round(2).to_string())


def _text_blocks(block: int) -> list[dict[str, torch.Tensor]]:
    """The standard library's documentation topics as byte blocks for causal LM training."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics.values()).encode("utf-8")), dtype=torch.long)
    usable = (len(data) // block) * block
    return [{"input_ids": chunk, "labels": chunk} for chunk in data[:usable].view(-1, block)]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/example-import"))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--save-every", type=int, default=25, help="steps between checkpoints")
    parser.add_argument("--width", type=int, default=64, help="GPT-2 n_embd")
    parser.add_argument("--block", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
