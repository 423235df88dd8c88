"""Record a HuggingFace Trainer run: a small GPT-2 (random init from a config) trained on text,
every matrix snapshotted into a spectra store by ``SpectraCallback``.

    python examples/hf_trainer.py [--out runs/hf-gpt2.zarr] [--steps 200] [--tiny]
    torchrun --nproc_per_node 2 examples/hf_trainer.py     # DDP: rank 0 writes the store

Needs ``pip install "spectra-dynamics[integrations,demo]"`` (transformers; the KJV text). With
--tiny it trains a 2-layer model for a few steps on Python's own help text (what CI runs).
"""

import argparse
import os
import shutil

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import spectra
from spectra.integrations.transformers import SpectraCallback
from spectra.tasks.data import CharCorpus, kjv_text, pydoc_text


class Windows(torch.utils.data.Dataset):
    """Fixed windows of a character corpus as causal-LM examples (labels = inputs)."""

    def __init__(self, corpus: CharCorpus, block: int, count: int):
        x, _ = corpus.batch("train", count, block, generator=torch.Generator().manual_seed(0))
        self.ids = x

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hf-gpt2.zarr")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="a few steps of a 2-layer model")
    args = parser.parse_args()
    steps = 6 if args.tiny else args.steps
    corpus = CharCorpus(pydoc_text() if args.tiny else kjv_text())
    width, layers, block = (32, 2, 32) if args.tiny else (128, 4, 128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=corpus.vocab_size, n_positions=block,
                                       n_embd=width, n_layer=layers, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    if int(os.environ.get("RANK", 0)) == 0:  # (under torchrun, rank 0 writes the store)
        shutil.rmtree(args.out, ignore_errors=True)
    callback = SpectraCallback(args.out, schedule="log")  # the Recorder's arguments
    training = TrainingArguments(output_dir="runs/hf-trainer-checkpoints", max_steps=steps,
                                 per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                 learning_rate=3e-3, warmup_steps=steps // 10, logging_steps=50,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=args.tiny)
    trainer = Trainer(model=model, args=training, callbacks=[callback],
                      train_dataset=Windows(corpus, block, 16 * steps))
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    run = spectra.open_run(callback.path)
    print(run)  # GPT-2's Conv1D weights are stored (out, in); lm_head (tied to wte) once
    frame = spectra.analyze(run, quiet=True)
    last = frame[(frame.step == run.steps[-1]) & (frame.target == "updates")
                 & (frame.metric == "effective_rank")]
    print(last[["param", "value"]].to_string(index=False))


if __name__ == "__main__":
    main()
