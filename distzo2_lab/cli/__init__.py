"""`distzo2`: the command line (train, eval, rebuild, demo, bench, plan)."""
from distzo2_lab.cli.main import main

__all__ = ["main"]
