"""distzo2_lab: learn, run and profile distributed zeroth-order fine-tuning of LLMs."""
__version__ = "0.1.0"

__all__ = ["ZOArguments", "ZOTrainer"]


def __getattr__(name: str):
    """ZOTrainer / ZOArguments import transformers' Trainer: loaded on first use only."""
    if name == "ZOTrainer":
        from distzo2_lab.hf.trainer import ZOTrainer

        return ZOTrainer
    if name == "ZOArguments":
        from distzo2_lab.hf.arguments import ZOArguments

        return ZOArguments
    raise AttributeError(f"module 'distzo2_lab' has no attribute {name!r}")
