"""`distzo2`: the command line (train, eval, rebuild, demo, bench, plan)."""
from distzo2_lab.run.threads import passive_wait_on_busy_machine

passive_wait_on_busy_machine()  # before torch loads: OpenMP reads OMP_WAIT_POLICY once

from distzo2_lab.cli.main import main  # noqa: E402

__all__ = ["main"]
