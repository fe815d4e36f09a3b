"""Model adapters and presets (layer 2): real Hugging Face models seen as ZO2 sees them."""
from .buckets import DTYPES, ParamBucket
from .opt import OPTAdapter
from .presets import OPT_SHAPES, PRESETS, build_model, count_parameters, opt_config

__all__ = ["DTYPES", "OPT_SHAPES", "PRESETS", "OPTAdapter", "ParamBucket", "build_model",
           "count_parameters", "opt_config"]
