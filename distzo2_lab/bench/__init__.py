"""Measurements of everything below: step efficiency, offload tiers, scaling, the device case,
SST-2, the first-order baseline and the calibration of this machine for the planner."""
