"""Road to OPT-175B: memory planner, stream simulator and hardware profiles (ZO2 Sec. 3.3; DistZO2 Sec. 3-4).

- :mod:`.hardware`: hardware profiles as data (A100, H100, RTX 4090, this machine).
- :mod:`.memory`: peak memory per device, host memory per node and disk, by component.
- :mod:`.simulator`: discrete-event simulation of every rank's lanes; emits span events.
- :mod:`.planner`: one layout's memory, step time, tokens/s, speed-ups; the nearest layout that fits.
- ``bench.calibrate``: ``distzo2 plan calibrate`` measures this machine into a profile.
- :mod:`.check`: run a layout for real here and set it beside the simulation.
- :mod:`.paper`: the published figures (ZO2 peaks, DistZO2 trace shares and headline) and the stated scenarios.
"""
from distzo2_lab.plan.hardware import PROFILES, THIS_MACHINE, Hardware, get_hardware
from distzo2_lab.plan.memory import THIS_ENGINE, ZO2_REFERENCE, Workload, memory_plan, model_shape
from distzo2_lab.plan.planner import nearest_fit, plan_layout
from distzo2_lab.plan.simulator import Simulation, activity_shares, simulate

__all__ = ["PROFILES", "THIS_MACHINE", "Hardware", "get_hardware", "THIS_ENGINE", "ZO2_REFERENCE", "Workload",
           "memory_plan", "model_shape", "nearest_fit", "plan_layout", "Simulation", "activity_shares", "simulate"]
