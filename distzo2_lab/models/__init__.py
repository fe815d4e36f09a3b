"""Model adapters and presets (layer 2): real Hugging Face models seen as ZO2 sees them."""
from .base import BlockAdapter, BlockContext
from .bert import BertAdapter
from .buckets import DTYPES, ParamBucket
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter, Qwen2Adapter
from .opt import OPTAdapter
from .presets import OPT_SHAPES, PRESETS, build_model, count_parameters, opt_config, preset_config
from .registry import FAMILIES, adapter_class, adapter_for

__all__ = ["DTYPES", "FAMILIES", "OPT_SHAPES", "PRESETS", "BertAdapter", "BlockAdapter", "BlockContext",
           "GPT2Adapter", "LlamaAdapter", "OPTAdapter", "ParamBucket", "Qwen2Adapter", "adapter_class",
           "adapter_for", "build_model", "count_parameters", "opt_config", "preset_config"]
