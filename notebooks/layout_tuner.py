# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The layout tuner: will it fit, how fast will it go, which layout wins
#
# DistZO2 (arXiv 2507.03211) runs ZO fine-tuning on a (dp × pert) grid of GPUs, optionally
# slicing every block over the ranks. Which grid is best depends on the model, the GPU's memory,
# its host link and NVLink. This notebook drives `distzo2_lab.plan`: a **memory planner** (peak
# memory per device by component) and a **stream simulator** (every rank's upload / compute /
# offload / exchange lanes as a discrete-event run) over hardware profiles given as data.

# %% [markdown]
# ## What you will see
#
# 1. Controls for model, GPUs, hardware, dp, pert, slicing, precision, batch, sequence, prefetch and
#    tier; every change redraws the **predicted memory**, the **step time / tokens/s / bottleneck**
#    and a **simulated timeline**.
# 2. **Run for real**: when the layout fits this machine (the tiny model, hardware
#    `this-machine`), the button trains it here with the package's launcher and overlays the
#    **measured lanes on the predicted ones**.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
CALIBRATION_DIR = os.path.join("runs", "plan")  # where `distzo2 plan calibrate` caches this machine
SIM_STEPS = 2 if SIZE == "tiny" else 3  # simulated steps (the first warms the pipeline)
REAL_STEPS = 3 if SIZE == "tiny" else 6  # steps of the real run behind the button
GLOO_PROBE = SIZE == "full"  # calibrate the exchange lane with two gloo ranks too
LIVE = SIZE == "full"  # draw into the widgets; headless CI shows the figures as cell outputs instead

# %%
import plotly.io as pio
from IPython.display import display

from distzo2_lab.plan.hardware import calibration_path
from distzo2_lab.plan.tuner import LayoutTuner

pio.renderers.default = "plotly_mimetype+notebook"  # works offline in Jupyter Lab / Notebook

# %% [markdown]
# ## 1. This machine as a hardware profile
#
# `distzo2 plan calibrate` times the package's own code paths for a few seconds (an OPT block
# forward, noise generation, the perturb pass, the copies of the upload / offload lanes, the
# disk, a gloo all-gather) and caches the profile as JSON. It is measured once and reused.

# %%
from distzo2_lab.bench.calibrate import calibrate
from distzo2_lab.plan.hardware import load_profile

path = calibration_path(CALIBRATION_DIR)
here = load_profile(path) if os.path.exists(path) else calibrate(CALIBRATION_DIR, collectives=GLOO_PROBE)
print(f"{here.description}; {here.tflops('fp32') * 1e3:.0f} GFLOP/s per thread; copies {here.h2d_gbps:.1f} GB/s")

# %% [markdown]
# ## 2. The tuner
#
# Start from OPT-1.3B on two A100s with PertP. Try slicing on 4 GPUs, an RTX 4090 (no NVLink:
# the all-gather crosses the host), or OPT-175B on 8 GPUs.

# %%
tuner = LayoutTuner(CALIBRATION_DIR, steps=SIM_STEPS, real_steps=REAL_STEPS, capture=LIVE)
tuner.redraw()
display(tuner.widget())
if not LIVE:
    display(tuner.figures["memory"], tuner.figures["timeline"])

# %% [markdown]
# ## 3. A layout that fits here, run for real
#
# The cell sets the controls to the tiny OPT on this machine, two ranks with PertP on the host
# tier, and calls the button's handler (clicking **Run for real** does the same). The measured
# lanes appear under the predicted ones; the simulator knows this machine only through the
# calibration above, and the other jobs on this machine make real timings noisy.

# %%
tuner.set(model="tiny", hardware="this-machine", gpus=2, dp=1, pert=2, slice=False, precision="fp32",
          batch=4, seq=32, prefetch=1, tier="host")
result = tuner.on_run()
print(f"ran for real: {result is not None}")
print(tuner.status.value)
if not LIVE and result is not None:
    display(tuner.figures["overlay"])

# %% [markdown]
# ## 4. Where the model stops
#
# The planner models memory and the lanes (see `docs/planner.md`): it knows nothing of kernel
# fusion, NCCL's protocol choices or thermal limits. On this machine thread hand-offs and other
# jobs dominate the tiny model; the OPT-125m rows of `benchmarks/planner.py` are the fairer test.
