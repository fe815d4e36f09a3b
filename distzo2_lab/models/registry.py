"""Which adapter drives which model: chosen by the config's ``model_type``."""
from __future__ import annotations

from torch import nn

from distzo2_lab.config import ConfigError
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.models.bert import BertAdapter
from distzo2_lab.models.gpt2 import GPT2Adapter
from distzo2_lab.models.llama import LlamaAdapter, Qwen2Adapter
from distzo2_lab.models.lora import frozen_patterns, hf_model, is_peft
from distzo2_lab.models.opt import OPTAdapter
from distzo2_lab.models.prefix import no_prefix_reason, prefix_embedding

ADAPTERS: dict[str, type[BlockAdapter]] = {a.family: a for a in
                                           (OPTAdapter, GPT2Adapter, LlamaAdapter, Qwen2Adapter, BertAdapter)}
FAMILIES = tuple(ADAPTERS)


def adapter_class(model_type: str) -> type[BlockAdapter]:
    """The adapter class of a config's model_type ('opt', 'gpt2', 'llama', 'qwen2', 'bert')."""
    if model_type not in ADAPTERS:
        raise ConfigError(f"model_type={model_type!r} has no adapter; the families are {', '.join(FAMILIES)}")
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module, storage: str = "fp32") -> BlockAdapter:
    """The family's adapter around a Hugging Face model (its buckets built with `storage`).

    A ``peft`` model is seen through its Hugging Face model; the adapter keeps it as `wrapper`
    and, in `frozen`, the zo.freeze patterns of everything it does not train (read before the
    adapter turns gradients off); a prefix-tuned model's table joins the resident-in bucket."""
    if not is_peft(model):
        return adapter_class(model.config.model_type)(model, storage)
    frozen = frozen_patterns(model)
    cls, prefix = adapter_class(model.config.model_type), prefix_embedding(model)
    if prefix is None:
        adapter = cls(hf_model(model), storage)
    elif cls.takes_prefix:
        adapter = cls(hf_model(model), storage, prefix=prefix)
    else:
        raise ConfigError(f"a peft prefix-tuned model of model_type={cls.family!r}: {no_prefix_reason(cls.family)}; "
                          "use LoRA for it")
    adapter.wrapper, adapter.frozen = model, frozen
    return adapter
