"""LoRA through ``peft``: low-rank adapters trained by ZO while the base model stays fixed.

A ``peft`` LoRA model is still the family's Hugging Face model with each target Linear wrapped
(``q_proj.base_layer`` plus ``q_proj.lora_A`` / ``lora_B``), so the family adapter sees it whole:
the buckets keep the block layout that streaming and slicing rely on. Only the adapters train:
every parameter ``peft`` marks ``requires_grad=False`` becomes a zo.freeze pattern (its z is 0),
so the base is never perturbed nor updated, and a seed log replays the same rule.
"""
from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn

from distzo2_lab.config import parse_peft
from distzo2_lab.seeds import derive_seed


def is_peft(model: nn.Module) -> bool:
    """True for a ``peft`` PeftModel (checked by class name: importing peft is not needed to ask)."""
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)


def hf_model(model: nn.Module) -> nn.Module:
    """The family's Hugging Face model inside a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


def wrap_peft(model: nn.Module, spec: str, seed: int) -> nn.Module:
    """`model` wrapped by ``peft`` as `spec` says: 'lora:R' (wrap_lora) or 'prefix:N' (prefix.wrap_prefix)."""
    from distzo2_lab.models.prefix import wrap_prefix

    kind, _ = parse_peft(spec)
    return wrap_lora(model, spec, seed) if kind == "lora" else wrap_prefix(model, spec, seed)


@torch.no_grad()
def wrap_lora(model: nn.Module, spec: str, seed: int) -> nn.Module:
    """`model` wrapped by ``peft`` with LoRA adapters of rank R ('lora:R') on the family's default
    target modules; dropout off (both perturbed passes must see one function); lora_A drawn from
    a generator seeded by `seed` (the caller's global RNG is left alone), lora_B zero."""
    from peft import LoraConfig, get_peft_model

    _, rank = parse_peft(spec)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "lora", 0))
        return get_peft_model(model, config)


def frozen_patterns(model: nn.Module) -> tuple[str, ...]:
    """zo.freeze patterns holding every parameter with ``requires_grad=False`` fixed (names as the
    adapter sees them), one pattern per block-invariant name ('model.decoder.layers.*.fc1.weight');
    exact names where a pattern would also catch a trainable parameter."""
    named = list(hf_model(model).named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    trainable = [n for n, p in named if p.requires_grad]
    patterns = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in frozen))
    if any(fnmatch.fnmatchcase(n, p) for n in trainable for p in patterns):
        patterns = frozen
    return tuple(patterns)


def trainable_names(model: nn.Module) -> list[str]:
    """Names (as the adapter sees them) of the parameters ``peft`` trains."""
    return [n for n, p in hf_model(model).named_parameters() if p.requires_grad]


def save_adapters(wrapper: nn.Module, tensors: dict[str, torch.Tensor], directory: str) -> None:
    """The adapters the peft way (adapter_config.json, adapter_model.safetensors) from `tensors`
    (name -> values, as the adapter names them): an offloaded model's blocks hold their values in
    a store, not in the wrapper's modules, so ``save_pretrained`` cannot read them."""
    import os

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from distzo2_lab.models.base import TABLE

    os.makedirs(directory, exist_ok=True)
    if TABLE in tensors:  # prefix tuning: peft saves the table itself, as 'prompt_embeddings'
        adapters = {"prompt_embeddings": tensors[TABLE]}
    else:
        state = {"base_model.model." + n: t for n, t in tensors.items() if ".lora_" in n}
        adapters = get_peft_model_state_dict(wrapper, state_dict=state, save_embedding_layers=False)
    save_file({k: v.contiguous() for k, v in adapters.items()}, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    wrapper.peft_config["default"].save_pretrained(directory)
