"""Model-level benchmark: plain PEFT against ``enable_fused`` on whole transformers models.

A case is (architecture, setup, base dtype, lora_dropout). Both contenders are built from the
same seed (identical weights, adapters included) and measured side by side in one process:

- ``saved_bytes``: what autograd keeps for backward over one training forward, distinct
  storages, parameters excluded (``lowrank_fused.saved_activations``);
- ``peak_bytes``: peak CUDA memory of one training step over what was allocated before it
  (None on a CPU);
- ``step_ms``: one training step (forward + backward + AdamW step), median of ``repeats``; the
  contenders' steps alternate, so a noisy machine slows both alike;
- ``loss_rel_diff`` / ``grad_rel_diff``: fused against PEFT on the first forward/backward from
  identical weights, when dropout is off (with dropout the masks differ by design: None).

Everything that varies is one entry in a table: ``ARCHS`` (a transformers config + the PEFT
target modules + the loss), ``SETUPS`` (LoraConfig options and what is done to the PEFT model:
LoRA-FA, LoRA-XS, and the same three over a 4-bit NF4 base: qlora, qlora_fa, qlora_xs), ``CONTENDERS`` (what turns the PEFT
model into the contender: nothing for PEFT, ``enable_fused`` for ours) and ``PRESETS`` (shapes).

Presets (``LOWRANK_MODEL_BENCH=<name>``; default ``compass`` on a GPU, ``ci`` on a CPU):
``ci`` (2 layers, d = 256, FFN 688 (BERT 1024), batch 2 x 128, r = 16, one thread: the CI
smoke run), ``reference``
(the figures' CPU setup: Llama, 2 layers, d = 512, FFN 1376, r = 16 on all seven projections,
batch 4 x 256, one thread), ``compass`` (LLaMA-7B and RoBERTa-large widths, 2 layers, bf16),
``tiny`` (the unit tests').
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

ENV_VAR = "LOWRANK_MODEL_BENCH"


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    layers: int
    d: int
    ff: int
    batch: int
    seq: int
    rank: int = 16
    head_dim: int = 64
    vocab: int = 1024


@dataclass(frozen=True)
class Preset:
    """Shapes per architecture, what runs, and how: ``threads`` (None: leave torch's setting)."""
    shapes: dict
    dtypes: tuple = ("float32", "bfloat16")
    dropouts: tuple = (0.0, 0.05)
    threads: Optional[int] = None
    warmup: int = 1
    repeats: int = 3
    four_bit: bool = True  # the QLoRA setups (where bitsandbytes is installed)


PRESETS = {
    "tiny": Preset({"llama": Shape(1, 64, 176, 2, 16, rank=4, head_dim=32, vocab=128),
                    "bert": Shape(1, 64, 256, 2, 16, rank=4, head_dim=32, vocab=128)},
                   warmup=0, repeats=1),
    # CI: the first (measured) forward/backward is the only warm-up, two timed steps; one
    # thread (about 25 s of CPU in all; two threads spin-wait on a shared 2-core machine); the
    # QLoRA setups stay out (tests/test_qlora.py and tests/test_model_level.py cover them)
    "ci": Preset({"llama": Shape(2, 256, 688, 2, 128), "bert": Shape(2, 256, 1024, 2, 128)},
                 threads=1, warmup=0, repeats=2, four_bit=False),
    "reference": Preset({"llama": Shape(2, 512, 1376, 4, 256)}, threads=1, repeats=5),
    # a GPU: bf16 bases only (an fp32 base is not how models this wide are tuned), so the 12
    # cases fit beside the other suites in gpu_session.sh's bench stage
    "compass": Preset({"llama": Shape(2, 4096, 11008, 4, 2048),
                       "bert": Shape(2, 1024, 4096, 16, 512)}, dtypes=("bfloat16",), repeats=10),
}


def preset_name() -> str:
    return os.environ.get(ENV_VAR) or ("compass" if torch.cuda.is_available() else "ci")


def preset(name: Optional[str] = None) -> Preset:
    name = name or preset_name()
    if name not in PRESETS:
        raise ValueError(f"{ENV_VAR}={name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------
# Architectures: a transformers config with random weights, the targets, a loss
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    build: Callable[[Shape], nn.Module]  # random weights from a config, nothing downloaded
    targets: tuple
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, input_ids) -> loss


def _llama(s: Shape) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = s.d // s.head_dim
    config = LlamaConfig(hidden_size=s.d, intermediate_size=s.ff, num_hidden_layers=s.layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         vocab_size=s.vocab, max_position_embeddings=max(s.seq, 128),
                         attention_dropout=0.0, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _bert(s: Shape) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=s.d, intermediate_size=s.ff, num_hidden_layers=s.layers,
                        num_attention_heads=s.d // s.head_dim, vocab_size=s.vocab,
                        max_position_embeddings=max(s.seq, 128), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForMaskedLM(config)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


ARCHS = {
    "llama": Arch(_llama, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"), _lm_loss),
    # "dense" is attention.output.dense, intermediate.dense, output.dense and the MLM head's
    # transform.dense (PEFT's suffix rule)
    "bert": Arch(_bert, ("query", "key", "value", "dense"), _lm_loss),
}


# --------------------------------------------------------------------------------------------
# Setups (what PEFT trains) and contenders (who computes it)
# --------------------------------------------------------------------------------------------

def _nonzero_b(model: nn.Module) -> None:
    """B = 0 at PEFT's init makes A's gradient zero and the comparison trivial: small random B."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def _lora_fa(model):
    from lowrank_fused.peft import freeze_lora_a

    _nonzero_b(model)
    freeze_lora_a(model)


def _lora_xs(model):
    from lowrank_fused.peft import convert_to_lora_xs

    convert_to_lora_xs(model, generator=torch.Generator().manual_seed(2))


@dataclass(frozen=True)
class Setup:
    """LoraConfig options beside (r, lora_alpha = 2r, targets, lora_dropout), and what is done
    to the PEFT model after get_peft_model (before either contender sees it). ``four_bit``:
    the targeted Linear layers are quantized in place to bitsandbytes NF4 (QLoRA; compute dtype
    = the case's base dtype) before get_peft_model, so PEFT builds its lora.bnb.Linear4bit
    layers; ``dtypes``: the base dtypes this setup runs in (None: the preset's)."""
    config: dict = field(default_factory=dict)
    prepare: Callable[[nn.Module], None] = _nonzero_b
    four_bit: bool = False
    dtypes: Optional[tuple] = None
    compute_dtype: Optional[str] = None  # a 4-bit base's; None: the case's base dtype


SETUPS = {
    "lora": Setup(),
    "lora_fa": Setup(prepare=_lora_fa),
    "lora_xs": Setup(prepare=_lora_xs),
    # QLoRA: a 4-bit NF4 base computing in bf16 (BitsAndBytesConfig(load_in_4bit,
    # bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bfloat16), quantized in place)
    "qlora": Setup(four_bit=True, compute_dtype="bfloat16"),
    "qlora_fa": Setup(prepare=_lora_fa, four_bit=True, compute_dtype="bfloat16"),
    "qlora_xs": Setup(prepare=_lora_xs, four_bit=True, compute_dtype="bfloat16"),
    # DoRA (PEFT's use_dora=True; served through the operator's magnitude=: Triton on a GPU,
    # the reference path on the CPU),
    # and DoRA-FA (freeze_lora_a on top)
    "dora": Setup(config={"use_dora": True}),
    "dora_fa": Setup(config={"use_dora": True}, prepare=_lora_fa),
}


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_4bit(model: nn.Module, targets, device, compute_dtype=None) -> nn.Module:
    """Replace, in place, the nn.Linear layers named by ``targets`` (PEFT's suffix rule) by
    bitsandbytes NF4 Linear4bit layers computing in their weight's dtype, as transformers'
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") loads them (the lm_head
    stays dense, as there), and mark the model loaded in 4 bits (PEFT then builds its
    lora.bnb.Linear4bit layers)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.split(".")[-1] not in targets:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features,
                              bias=module.bias is not None,
                              compute_dtype=compute_dtype or module.weight.dtype,
                              quant_type="nf4", compress_statistics=False, device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.detach().cpu(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=False)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().cpu(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                q.to(device))  # .to() quantizes
    model.is_loaded_in_4bit = True
    return model


def _fused(model) -> dict:
    from lowrank_fused.peft import enable_fused

    with warnings.catch_warnings():  # fallbacks are counted in the figures instead
        warnings.simplefilter("ignore")
        result = enable_fused(model)
    return dict(served_layers=len(result.served), fallback_layers=len(result.fallbacks))


# name -> what turns the PEFT model into that contender (returns figures to record, or None);
# the first is the baseline every ratio is taken against
CONTENDERS = {"peft": lambda model: None, "fused": _fused}


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    arch: str
    setup: str
    dtype: str  # of the base; adapters stay fp32 (PEFT's autocast_adapter_dtype default)
    dropout: float
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.setup}-{self.dtype}-p{self.dropout:g}"


def cases(name: Optional[str] = None) -> list[Case]:
    p = preset(name)
    setups = [s for s in SETUPS if not SETUPS[s].four_bit
              or (p.four_bit and bitsandbytes_available())]
    return [Case(arch, setup, dtype, dropout, shape) for arch, shape in p.shapes.items()
            for setup in setups for dtype in (SETUPS[setup].dtypes or p.dtypes)
            for dropout in p.dropouts]


def build(case: Case, device) -> nn.Module:
    """The PEFT model of ``case`` (same seed, same weights every call), in train mode."""
    from peft import LoraConfig, get_peft_model

    s = case.shape
    torch.manual_seed(0)
    model = ARCHS[case.arch].build(s).to(device=device, dtype=getattr(torch, case.dtype))
    if SETUPS[case.setup].four_bit:
        compute = SETUPS[case.setup].compute_dtype
        quantize_4bit(model, ARCHS[case.arch].targets, device,
                      getattr(torch, compute) if compute else None)
    config = LoraConfig(r=s.rank, lora_alpha=2 * s.rank, lora_dropout=case.dropout,
                        target_modules=list(ARCHS[case.arch].targets), **SETUPS[case.setup].config)
    with warnings.catch_warnings():  # transformers' deprecation notice inside get_peft_model
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        model = get_peft_model(model, config)
    SETUPS[case.setup].prepare(model)
    return model.train()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the largest error relative to the tensor's scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def _threads(n: Optional[int]):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_case(case: Case, device="cpu", *, warmup: int = 1, repeats: int = 3,
             threads: Optional[int] = None) -> dict:
    """The figures of one case (a JSON-ready dict): per contender saved bytes, peak bytes and
    step time, their ratios to the baseline (PEFT), and the agreement with dropout off."""
    from lowrank_fused.saved_activations import SavedActivations

    device = torch.device(device)
    arch = ARCHS[case.arch]
    with _threads(threads):
        generator = torch.Generator().manual_seed(3)
        ids = torch.randint(0, case.shape.vocab, (case.shape.batch, case.shape.seq),
                            generator=generator).to(device)
        models, optimizers, figures, grads, losses = {}, {}, {}, {}, {}
        for name, make in CONTENDERS.items():
            model = build(case, device)
            made = make(model) or {}
            models[name] = model
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizers[name] = torch.optim.AdamW(trainable, lr=1e-4)
            # 1. what autograd keeps, and the first loss and gradients from identical weights
            torch.manual_seed(4)
            with SavedActivations(model) as saved:
                loss = arch.loss(model, ids)
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad}
            model.zero_grad(set_to_none=True)
            figures[name] = dict(saved_bytes=saved.nbytes,
                                 trainable=sum(map(torch.numel, trainable)), **made)
            del saved, loss

        floor = frozen_model_bytes(models[next(iter(CONTENDERS))], arch, ids)

        def step(name):
            model, optimizer = models[name], optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            arch.loss(model, ids).backward()
            optimizer.step()

        # 2. step times, alternating contenders; peak memory of one step after the warm-up
        for _ in range(warmup):
            for name in CONTENDERS:
                step(name)
        for name in CONTENDERS:
            figures[name]["peak_bytes"] = None
            if device.type == "cuda":
                _sync(device)
                start = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step(name)
                _sync(device)
                figures[name]["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
        samples = {name: [] for name in CONTENDERS}
        for _ in range(repeats):
            for name in CONTENDERS:
                _sync(device)
                t0 = time.perf_counter()
                step(name)
                _sync(device)
                samples[name].append((time.perf_counter() - t0) * 1e3)
        for name in CONTENDERS:
            figures[name]["step_ms"] = statistics.median(samples[name])
            figures[name]["step_ms_samples"] = samples[name]

    base, *others = CONTENDERS
    ratios = {}
    for name in others:
        for key in ("saved_bytes", "peak_bytes", "step_ms"):
            b, o = figures[base][key], figures[name][key]
            ratios[f"{key}_{name}_over_{base}"] = o / b if b and o is not None else None
    for name in others:  # the bytes the adapted layers add to the frozen model's own
        b, o = figures[base]["saved_bytes"] - floor, figures[name]["saved_bytes"] - floor
        ratios[f"added_bytes_{name}_over_{base}"] = o / b if b > 0 else None
    agreement = {}
    for name in others:
        if case.dropout == 0:
            agreement[f"loss_rel_diff_{name}"] = _rel(losses[name], losses[base])
            agreement[f"grad_rel_diff_{name}"] = max(_rel(grads[name][n], g)
                                                     for n, g in grads[base].items())
        else:
            agreement[f"loss_rel_diff_{name}"] = agreement[f"grad_rel_diff_{name}"] = None
    return dict(model_level=True, case=case.id, model=case.arch, setup=case.setup,
                base_dtype=case.dtype, adapter_dtype="float32", dropout=case.dropout,
                shape=asdict(case.shape), tokens=case.shape.batch * case.shape.seq,
                threads=torch.get_num_threads() if threads is None else threads,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                warmup=warmup, repeats=repeats, frozen_model_bytes=floor, contenders=figures,
                **ratios, **agreement)


def frozen_model_bytes(model: nn.Module, arch: Arch, ids: torch.Tensor) -> int:
    """What the model keeps for backward by itself: the same PEFT model with its adapters off and
    a gradient entering at each adapted layer's output, as the adapters' would (the same graph,
    minus what the adapters keep). No adapter implementation can keep less; the ``added_bytes``
    ratios are taken over it."""
    from peft.tuners.lora import LoraLayer

    from lowrank_fused.saved_activations import SavedActivations

    def enter_gradient(module, args, out):
        return out if out.requires_grad else out.requires_grad_()

    hooks = [m.get_base_layer().register_forward_hook(enter_gradient)
             for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        with model.disable_adapter(), SavedActivations(model) as saved:
            loss = arch.loss(model, ids)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    return saved.nbytes


def tolerance(case: Case) -> float:
    """Max relative difference allowed between fused and PEFT (dropout off): fp32 math agrees to
    rounding; a 16-bit base rounds the low-rank term at a different point than PEFT does."""
    compute = SETUPS[case.setup].compute_dtype or case.dtype  # a 4-bit base computes in its own
    return 1e-3 if compute == "float32" else 5e-2

