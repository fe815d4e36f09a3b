"""distzo2_lab: learn, run and profile distributed zeroth-order fine-tuning of LLMs."""
__version__ = "0.1.0"
