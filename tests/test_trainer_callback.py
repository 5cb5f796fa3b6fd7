"""``FusedLoraCallback`` with transformers' ``Trainer`` and TRL's ``SFTTrainer`` (issue 29, item 3),
on a tiny Llama from a config and datasets of token ids (no hub, no tokenizer download): the
losses of plain PEFT with dropout off, LoRA-FA frozen before the optimizer exists, the call
counts in the logs, checkpoints that plain PEFT loads with identical outputs, and a resumed run
that goes on served and lands where the uninterrupted one does."""
import json
import os

import pytest
import torch

pytest.importorskip("peft", reason="the peft package is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from peft_helpers import LLAMA_TARGETS, tiny_llama  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 64
LAYERS = 14  # 2 decoder layers x 7 projections


def lora_config(**config):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS,
                      **config)


def sequences(n=16, seq=8):
    return [torch.randint(3, VOCAB, (seq,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(n)]


def common_args(out, steps, save_steps=None):
    return dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                learning_rate=1e-2, report_to=[], logging_steps=1, use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True,
                save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)


def losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def hf_trainer(out, fused, freeze=False, steps=3, save_steps=None):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), lora_config())
    callbacks = []
    if fused:
        callbacks.append(lfp.FusedLoraCallback(freeze_lora_a=freeze, backend="reference"))
    elif freeze:
        lfp.freeze_lora_a(model)  # the plain twin: LoRA-FA by hand, before the Trainer
    data = [{"input_ids": ids, "labels": ids} for ids in sequences()]
    return Trainer(model=model, args=TrainingArguments(**common_args(out, steps, save_steps)),
                   train_dataset=data, callbacks=callbacks)


def lora_a(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


@pytest.mark.parametrize("freeze", [False, True], ids=["lora", "lora_fa"])
def test_trainer_with_the_callback_gives_plain_peft_losses_and_logs_the_counts(tmp_path, freeze):
    plain = hf_trainer(tmp_path / "plain", fused=False, freeze=freeze)
    plain.train()
    trainer = hf_trainer(tmp_path / "fused", fused=True, freeze=freeze)
    model = trainer.model
    a_before = lora_a(model)
    if freeze:  # frozen when the Trainer was built, before train() makes the optimizer
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    trainer.train()
    torch.testing.assert_close(torch.tensor(losses(trainer)), torch.tensor(losses(plain)),
                               rtol=1e-5, atol=1e-6)
    callback = next(c for c in trainer.callback_handler.callbacks
                    if isinstance(c, lfp.FusedLoraCallback))
    assert len(callback.result.served) == LAYERS and not callback.result.fallbacks
    steps = [log for log in trainer.state.log_history if "loss" in log]
    for log in steps:  # one forward and one backward per layer and step, counted from enable
        assert log["lowrank_fused/reference/forward"] == LAYERS * log["step"], log
        assert log["lowrank_fused/reference/backward"] == LAYERS * log["step"], log
        assert log["lowrank_fused/served_layers"] == LAYERS
        assert log["lowrank_fused/fallback_layers"] == 0
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    a_params = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert all((id(p) in in_optimizer) != freeze for p in a_params)
    a_after = lora_a(model)
    assert all(torch.equal(a_after[n], a_before[n]) == freeze for n in a_before)


def test_strict_stops_train_before_the_first_step_listing_every_layer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), lora_config(lora_bias=True))
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path, 2)),
                      train_dataset=[{"input_ids": s, "labels": s} for s in sequences()],
                      callbacks=[lfp.FusedLoraCallback(strict=True)])
    with pytest.raises(ValueError, match=f"{LAYERS} of {LAYERS} LoRA layers") as err:
        trainer.train()
    assert str(err.value).count("has a LoRA bias") == LAYERS
    assert trainer.state.global_step == 0


def _adapter_files(folder):
    from safetensors.torch import load_file
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def test_checkpoints_are_plain_peft_and_a_resumed_run_goes_on_served(tmp_path):
    plain = hf_trainer(tmp_path / "plain", fused=False, freeze=True, steps=4, save_steps=2)
    plain.train()
    full = hf_trainer(tmp_path / "full", fused=True, freeze=True, steps=4, save_steps=2)
    full.train()
    torch.testing.assert_close(torch.tensor(losses(full)), torch.tensor(losses(plain)),
                               rtol=1e-5, atol=1e-6)

    # the checkpoints hold PEFT's files, under PEFT's names, nothing of ours
    for step in (2, 4):
        ours = _adapter_files(tmp_path / "full" / f"checkpoint-{step}")
        theirs = _adapter_files(tmp_path / "plain" / f"checkpoint-{step}")
        assert ours[0] == theirs[0]
        assert set(ours[1]) == set(theirs[1]) and ours[1]
        for key in theirs[1]:
            torch.testing.assert_close(ours[1][key], theirs[1][key], rtol=1e-4, atol=1e-6)

    # plain PEFT loads the last checkpoint with the trained model's outputs, bit for bit
    ids = torch.tensor(sequences(2))
    trained = full.model
    with torch.no_grad():
        served = trained(input_ids=ids).logits
        lfp.disable_fused(trained)
        peft_own = trained(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "full" / "checkpoint-4"))
        assert not any(type(m) is lfp.FusedLoraLinear for m in loaded.modules())
        reloaded = loaded(input_ids=ids).logits
    assert torch.equal(reloaded, peft_own)
    torch.testing.assert_close(served, reloaded, rtol=1e-5, atol=1e-5)

    # resumed from step 2: served again (after the checkpoint is loaded), steps 3 and 4 as before
    resumed = hf_trainer(tmp_path / "full", fused=True, freeze=True, steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    after = [log["loss"] for log in resumed.state.log_history if "loss" in log and log["step"] > 2]
    torch.testing.assert_close(torch.tensor(after), torch.tensor(losses(full)[2:]),
                               rtol=1e-5, atol=1e-6)
    stats = lfp.stats(resumed.model)
    assert stats.calls("forward") == LAYERS * 2 and stats.calls("backward") == LAYERS * 2
    assert not any(p.requires_grad for n, p in resumed.model.named_parameters() if "lora_A" in n)


# SFTConfig turns bf16 autocast on by default (on a CPU too): there PEFT and the operator round
# the low-rank branch at different points, so the losses agree to bf16's precision only
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_trl_sft_trainer_with_the_callback_gives_plain_peft_losses(tmp_path, bf16):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    datasets = pytest.importorskip("datasets", reason="TRL's SFTTrainer needs datasets")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # a local word-level tokenizer over the model's 64 ids: SFTTrainer needs one for padding
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>",
        eos_token="</s>", unk_token="<unk>")
    dataset = datasets.Dataset.from_dict({"input_ids": sequences()})

    def sft(out, callbacks):
        args = trl.SFTConfig(**common_args(out, 3), bf16=bf16)
        trainer = trl.SFTTrainer(model=tiny_llama(), args=args,
                                 train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=lora_config(), callbacks=callbacks)
        trainer.train()
        return trainer

    plain = sft(tmp_path / "plain", [])
    fused = sft(tmp_path / "fused", [lfp.FusedLoraCallback(freeze_lora_a=False)])
    assert isinstance(fused.model, PeftModel)  # TRL built it from peft_config
    tol = 2e-3 if bf16 else 1e-5
    torch.testing.assert_close(torch.tensor(losses(fused)), torch.tensor(losses(plain)),
                               rtol=tol, atol=tol)
    last = [log for log in fused.state.log_history if "loss" in log][-1]
    # SFTTrainer checkpoints activations by default: every forward runs again in backward
    assert last["lowrank_fused/reference/forward"] == LAYERS * 3
    assert last["lowrank_fused/reference/recompute"] == LAYERS * 3
    assert last["lowrank_fused/reference/backward"] == LAYERS * 3
