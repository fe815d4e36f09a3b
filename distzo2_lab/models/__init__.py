"""Model adapters and presets: real Hugging Face models seen as ZO2 sees them."""
from distzo2_lab.models.base import BlockAdapter, BlockContext
from distzo2_lab.models.bert import BertAdapter
from distzo2_lab.models.buckets import DTYPES, ParamBucket
from distzo2_lab.models.gpt2 import GPT2Adapter
from distzo2_lab.models.llama import LlamaAdapter, Qwen2Adapter
from distzo2_lab.models.opt import OPTAdapter
from distzo2_lab.models.presets import OPT_SHAPES, PRESETS, build_model, count_parameters, opt_config, preset_config
from distzo2_lab.models.registry import FAMILIES, adapter_class, adapter_for

__all__ = ["DTYPES", "FAMILIES", "OPT_SHAPES", "PRESETS", "BertAdapter", "BlockAdapter", "BlockContext",
           "GPT2Adapter", "LlamaAdapter", "OPTAdapter", "ParamBucket", "Qwen2Adapter", "adapter_class",
           "adapter_for", "build_model", "count_parameters", "opt_config", "preset_config"]
