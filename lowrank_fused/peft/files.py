"""LoRA-XS files: PEFT's own files, which plain PEFT loads with identical outputs, plus ours.

A ``save_lora_xs`` folder holds
- ``adapter_config.json`` and ``adapter_model.safetensors``: PEFT's files, with lora_A and
  lora_B = B·Rᵀ (the product) under PEFT's key names, so ``PeftModel.from_pretrained`` alone
  computes what the LoRA-XS model computes;
- ``lora_xs_latent.safetensors`` (``<layer>.factor`` = B, ``<layer>.latent`` = R) and
  ``lora_xs_config.json`` (method, adapter name, SHA-256 of both safetensors files): what
  LoRA-XS needs to go on training, and what tells a corrupt file from a good one.

Saving validates first, writes into a temporary folder beside the target and then swaps the
folders, so a failure leaves the previous adapter as it was. Loading reads and checks every file
(safetensors headers and contents, both configs, key sets, shapes, dtypes, B·Rᵀ = lora_B) before
the base model is touched.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from torch import nn

from .. import quantized
from .lora_layers import lora_linear_layers
from .lora_xs import convert_to_lora_xs, factor, latent_of, latents

LATENT_FILE = "lora_xs_latent.safetensors"
LATENT_CONFIG = "lora_xs_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _collect(model, adapter: str) -> tuple[dict, dict]:
    """PEFT's tensors and ours, for every LoRA-XS layer of ``adapter``; raises before writing."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or adapter not in config:
        raise ValueError(f"save_lora_xs expected a PeftModel with adapter {adapter!r}; "
                         f"got adapters {sorted(config) if isinstance(config, dict) else None}")
    layers = lora_linear_layers(model, adapter)
    plain = [n for n, m in layers if not hasattr(m.lora_B[adapter], "parametrizations")]
    if not layers or plain:
        raise ValueError(f"adapter {adapter!r} is not LoRA-XS (layers without a latent: "
                         f"{plain[:5] or 'all'}): call convert_to_lora_xs first")
    peft_tensors, xs_tensors = {}, {}
    for name, module in layers:
        lora_b = module.lora_B[adapter]
        # PEFT's file keys drop the adapter name: "<module>.lora_A.weight".
        peft_tensors[f"{name}.lora_A.weight"] = module.lora_A[adapter].weight.detach().contiguous()
        peft_tensors[f"{name}.lora_B.weight"] = lora_b.weight.detach().contiguous()
        xs_tensors[f"{name}.factor"] = factor(lora_b).detach().contiguous()
        xs_tensors[f"{name}.latent"] = latent_of(lora_b).detach().contiguous()
    return peft_tensors, xs_tensors


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(folder: Path, model, adapter: str, peft_tensors: dict, xs_tensors: dict) -> None:
    from safetensors.torch import save_file
    model.peft_config[adapter].save_pretrained(str(folder))
    save_file(peft_tensors, str(folder / PEFT_WEIGHTS))
    save_file(xs_tensors, str(folder / LATENT_FILE))
    digests = {f: _sha256((folder / f).read_bytes()) for f in (PEFT_WEIGHTS, LATENT_FILE)}
    (folder / LATENT_CONFIG).write_text(json.dumps(
        {"method": "lora_xs", "adapter": adapter, "sha256": digests}, indent=1))


def _replace_folder(new: Path, target: Path) -> None:
    """Put ``new`` where ``target`` is; files of ``target`` that are not ours stay."""
    if not target.exists():
        new.rename(target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"save_lora_xs: {target} exists and is not a folder")
    for item in target.iterdir():
        if not (new / item.name).exists():
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, new / item.name)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_lora_xs(model, directory, adapter: str = "default") -> None:
    """Save LoRA-XS adapter ``adapter`` of ``model`` into ``directory`` (see the module doc);
    the previous content survives any failure."""
    peft_tensors, xs_tensors = _collect(model, adapter)
    target = Path(directory).resolve()  # "." or "dir/" have no name to put a sibling beside
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write(temporary, model, adapter, peft_tensors, xs_tensors)
        _replace_folder(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load_lora_xs: {path} is not a readable JSON file: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"load_lora_xs: {path} should hold a JSON object, "
                         f"got {type(value).__name__}")
    return value


def _read_tensors(path: Path, digest) -> dict:
    from safetensors.torch import load
    data = path.read_bytes()
    if digest is not None and _sha256(data) != digest:
        raise ValueError(f"load_lora_xs: {path} changed since save_lora_xs wrote it (its SHA-256 "
                         f"differs from the one in {LATENT_CONFIG}): corrupt or replaced")
    try:
        return load(data)
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"load_lora_xs: {path} is not a readable safetensors file "
                         f"(truncated or corrupt?): {err}") from err


def _key_sets_match(path: Path, got: set, want: set) -> None:
    if got != want:
        raise ValueError(f"load_lora_xs: {path} has missing keys {sorted(want - got)[:8]} and "
                         f"unexpected keys {sorted(got - want)[:8]}")


def _check_layer(base_model: nn.Module, folder: Path, name: str, a, b, b_factor, latent) -> None:
    path = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    try:
        base = base_model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"load_lora_xs: the files in {folder} adapt {path!r}, which the base "
                         "model does not have") from None
    if not isinstance(base, nn.Linear):
        raise ValueError(f"load_lora_xs: {path!r} is a {type(base).__name__}, expected nn.Linear")
    n, k = quantized.shape(base.weight)
    r = a.shape[0] if a.dim() == 2 else -1
    want = {"lora_A": (a, (r, k)), "lora_B": (b, (n, r)), "factor": (b_factor, (n, r)),
            "latent": (latent, (r, r))}
    for what, (tensor, shape) in want.items():
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ValueError(f"load_lora_xs: {what} of {path!r} in {folder} is {tensor.dtype} "
                             f"{tuple(tensor.shape)}, expected a floating-point tensor of shape "
                             f"{shape} (base weight {(n, k)}, rank {r})")
        if tensor.dtype != a.dtype:
            raise ValueError(f"load_lora_xs: {what} of {path!r} in {folder} is {tensor.dtype} "
                             f"{tuple(tensor.shape)}, expected {a.dtype} (lora_A's dtype)")
    product = b_factor.double() @ latent.double().T
    tol = 1e-5 if b.dtype == torch.float32 else 2e-2
    if not torch.allclose(product, b.double(), rtol=tol, atol=tol * float(product.abs().max())):
        raise ValueError(f"load_lora_xs: for {path!r}, lora_B in {PEFT_WEIGHTS} is not factor·"
                         f"latentᵀ from {LATENT_FILE}: the files are corrupt or from "
                         "different saves")


def _read_checked(base_model: nn.Module, folder: Path):
    missing = [f for f in (PEFT_CONFIG, PEFT_WEIGHTS, LATENT_FILE, LATENT_CONFIG)
               if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"load_lora_xs: {folder} lacks {missing}: expected a folder "
                                "written by save_lora_xs")
    peft_config = _read_json(folder / PEFT_CONFIG)
    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"load_lora_xs: {folder / PEFT_CONFIG} has peft_type "
                         f"{peft_config.get('peft_type')!r}, expected 'LORA'")
    xs_config = _read_json(folder / LATENT_CONFIG)
    adapter = xs_config.get("adapter")
    if xs_config.get("method") != "lora_xs" or not isinstance(adapter, str) or not adapter:
        raise ValueError(f"load_lora_xs: {folder / LATENT_CONFIG} should hold method 'lora_xs' "
                         f"and an adapter name, got {xs_config}")
    digests = xs_config.get("sha256") or {}  # absent in folders saved before digests
    if not isinstance(digests, dict):
        raise ValueError(f"load_lora_xs: {folder / LATENT_CONFIG}: 'sha256' should be an object")
    peft_tensors = _read_tensors(folder / PEFT_WEIGHTS, digests.get(PEFT_WEIGHTS))
    xs_tensors = _read_tensors(folder / LATENT_FILE, digests.get(LATENT_FILE))
    names = sorted({k.rsplit(".", 2)[0] for k in peft_tensors})
    _key_sets_match(folder / PEFT_WEIGHTS, set(peft_tensors),
                    {f"{n}.{w}.weight" for n in names for w in ("lora_A", "lora_B")})
    _key_sets_match(folder / LATENT_FILE, set(xs_tensors),
                    {f"{n}.{w}" for n in names for w in ("factor", "latent")})
    if not names:
        raise ValueError(f"load_lora_xs: {folder / PEFT_WEIGHTS} holds no adapter tensors")
    for n in names:
        _check_layer(base_model, folder, n, peft_tensors[f"{n}.lora_A.weight"],
                     peft_tensors[f"{n}.lora_B.weight"], xs_tensors[f"{n}.factor"],
                     xs_tensors[f"{n}.latent"])
    return adapter, xs_tensors


def load_lora_xs(base_model: nn.Module, directory, *, is_trainable: bool = False):
    """The PEFT model saved by ``save_lora_xs`` (any adapter name): every file is checked
    before ``base_model`` is touched, then PEFT loads its files and we add B and R."""
    from peft import PeftModel

    folder = Path(directory)
    adapter, xs_tensors = _read_checked(base_model, folder)
    model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter,
                                      is_trainable=is_trainable)
    convert_to_lora_xs(model, adapter, init=False)
    current = latents(model, adapter)
    _key_sets_match(folder / LATENT_FILE, {f"{n}.latent" for n in current},
                    {k for k in xs_tensors if k.endswith(".latent")})
    with torch.no_grad():
        for name, module in lora_linear_layers(model, adapter):
            lora_b = module.lora_B[adapter]
            factor(lora_b).copy_(xs_tensors[f"{name}.factor"])
            latent_of(lora_b).copy_(xs_tensors[f"{name}.latent"])
            latent_of(lora_b).requires_grad_(is_trainable)
    return model
