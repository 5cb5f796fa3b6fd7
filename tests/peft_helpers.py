"""Tiny PEFT models and a counter of fused-operator calls, shared by the PEFT tests."""
import contextlib

import torch
from torch import nn

from peft import LoraConfig, get_peft_model

import lowrank_fused.functional as functional
import lowrank_fused.ops as ops


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 24)
        self.v = nn.Linear(24, 24)
        self.out = nn.Linear(24, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.v(torch.relu(self.q(x)))))


def small_peft(dtype=torch.float32, adapter_name="default", **config):
    torch.manual_seed(0)
    config = dict(dict(r=4, lora_alpha=8, target_modules=["q", "v"]), **config)
    model = get_peft_model(Small().to(dtype), LoraConfig(**config), adapter_name=adapter_name)
    nonzero_b(model)
    return model


def nonzero_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))


@contextlib.contextmanager
def counting_ops():
    """Record (scaling, dropout_p, rank) of every forward call that reaches the fused operator:
    the one body every path runs (ops.run_forward: eager autograd.Function, no-grad call and the
    custom op under torch.compile alike; plain, DoRA and 4-bit calls alike)."""
    calls = []
    real = ops.run_forward

    def counted(x, weight, bias, lora_a, lora_b, latent, magnitude, call, *args, **kwargs):
        calls.append((call.scaling, call.dropout_p, lora_a.shape[0]))
        return real(x, weight, bias, lora_a, lora_b, latent, magnitude, call, *args, **kwargs)

    patched = [(module, "run_forward") for module in (ops, functional)]
    for module, name in patched:
        setattr(module, name, counted)
    try:
        yield calls
    finally:
        for module, name in patched:
            setattr(module, name, real)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers=2, vocab=64):
    """A Llama from a config (random weights, nothing downloaded): hidden 32, 7 Linear layers
    per decoder layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=64, attention_dropout=0.0,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def tiny_llama_peft(layers=2, nonzero=True, **config):
    """``tiny_llama`` with PEFT LoRA (r = 4) on every projection; B made nonzero, so A has a
    gradient."""
    config = dict(dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), **config)
    model = get_peft_model(tiny_llama(layers), LoraConfig(**config))
    if nonzero:
        nonzero_b(model)
    return model


def token_ids(batch=2, seq=8, vocab=64, seed=3):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
