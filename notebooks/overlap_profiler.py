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
# # The overlap profiler: watch the lanes of a distributed ZO run
#
# ZO2 (arXiv 2503.12668, Sec. 3.3) hides the upload and offload of transformer blocks under
# compute; DistZO2 (arXiv 2507.03211, Sec. 4) spreads the perturbations over ranks. Both papers
# show *whether the hiding works* as Nsight traces, read after the run. Here every rank sends its
# span events to the notebook *while it trains*, and you see the lanes move.

# %% [markdown]
# ## What you will see
#
# 1. A two-rank PertP run (one rank `+eps`, the other `-eps`) launched from this notebook, with a
#    **live timeline** (one row per rank and lane), loss, projected gradient and tokens/s. The
#    cell returns at once; the **Stop** button stops the run.
# 2. The run's **overlap metrics**: busy fraction per lane, transfer time hidden under compute,
#    bubbles (compute waiting for a block), bytes per step.
# 3. **Two layouts compared** on one time axis: PertP (dp=1 x pert=2) and DDP (dp=2 x pert=1).
# 4. The same steps under **torch.profiler**: a Perfetto trace and a TensorBoard run, and the
#    overlap read back from the profiler's ranges.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
STEPS = 4 if SIZE == "tiny" else 60  # ZO steps per run
BATCH, SEQ = (4, 16) if SIZE == "tiny" else (8, 64)
WINDOW_S = 2.0  # seconds of lanes the live timeline shows
TIMEOUT = 300  # seconds before a run is stopped

# %%
import tempfile

import plotly.io as pio

from distzo2_lab.config import OffloadConfig, TrainConfig
from distzo2_lab.run.worker import train_worker
from distzo2_lab.parallel.launch import launch
from distzo2_lab.observe.live import LiveView
from distzo2_lab.parallel.layout import Layout

pio.renderers.default = "plotly_mimetype+notebook"  # static figures also work offline
tmp = tempfile.TemporaryDirectory(prefix="distzo2-overlap-")
cfg = TrainConfig(model="tiny-deep", steps=STEPS, batch_size=BATCH, seq_len=SEQ, threads=1,
                  offload=OffloadConfig(tier="host"))

# %% [markdown]
# ## 1. A live run
#
# `train_worker(..., live=True)` (the fifth launch argument) makes every rank forward its spans,
# batched every 0.1 s, and a record per step through the launcher's queue. `LiveView.start`
# shows the widget and a Stop button and follows the run on a background thread, redrawing at
# most 10 times a second. Hover a bar for its step, block and bytes.

# %%
pertp = Layout(dp=1, pert=2)
view = LiveView(title=f"tiny OPT, {pertp.describe()}, host tier", window_s=WINDOW_S)
handle = launch(train_worker, pertp.world_size, args=(cfg, pertp, None, None, True), timeout=TIMEOUT)
view.start(handle);  # returns at once

# %% [markdown]
# The cell above returned while the ranks were still training. `join()` waits for the end
# (`watch(handle)` is the blocking form, used below).

# %%
results = view.join()
print("steps seen live per rank:", {r: len(s) for r, s in view.steps.items()})
print("same weights on both ranks:", results[0]["digest"] == results[1]["digest"])

# %% [markdown]
# ## 2. Overlap metrics
#
# * **busy**: the share of the rank's window in which the lane works;
# * **hidden**: the share of upload + offload time during which compute also runs;
# * **bubble**: time compute sat idle waiting for a block's data (summed over steps);
# * **MB/step**: bytes a lane moved per step. `docs/profiling.md` says more.

# %%
from distzo2_lab.observe.viz import bubble_figure, compare_runs

spans = view.rank_spans()
compare_runs({"PertP": spans}, title="the live run and its metrics").show()
bubble_figure(spans).show()

# %% [markdown]
# ## 3. Two layouts on one time axis
#
# DDP splits the batch over the ranks (each runs both signs on half the rows); PertP gives each
# rank one sign of the whole batch. `watch` is the blocking form: it returns when the run ends.
# Each run starts at 0 s in the comparison; tokens/s is the global batch's, from rank 0's steps.

# %%
from distzo2_lab.observe.metrics import tokens_rate

ddp = Layout(dp=2, pert=1)
ddp_view = LiveView(widget=False)
ddp_view.watch(launch(train_worker, ddp.world_size, args=(cfg, ddp, None, None, True), timeout=TIMEOUT),
               display=False)
runs = {"PertP dp=1 x pert=2": spans, "DDP dp=2 x pert=1": ddp_view.rank_spans()}
rates = {"PertP dp=1 x pert=2": tokens_rate(view.steps[0]),
         "DDP dp=2 x pert=1": 2 * tokens_rate(ddp_view.steps[0])}  # each DDP rank holds half the rows
compare_runs(runs, tokens=rates, title="PertP vs DDP, tiny OPT, host tier").show()

# %% [markdown]
# ## 4. torch.profiler
#
# `train(cfg, profile=DIR)` (or `distzo2 train --profile DIR`) runs the steps under
# `torch.profiler` (wait 1, warm up 1, record 3 steps by default). Every phase is a
# `distzo2::<lane>::<phase>` range. Open `rank0.pt.trace.json` at https://ui.perfetto.dev, or run
# `tensorboard --logdir DIR/tb` (torch-tb-profiler).

# %%
from distzo2_lab.observe.events import overlap_metrics
from distzo2_lab.observe.profiling import ProfileOptions, phase_spans
from distzo2_lab.run.train import train

summary = train(cfg, progress=False, profile=ProfileOptions(f"{tmp.name}/prof", wait=0, warmup=1, active=2))
print("Perfetto trace:", summary["profile"]["chrome"])
ranges = phase_spans(summary["profile"]["chrome"])
print("phase ranges in the trace:", sorted({f"{s.lane}::{s.phase}" for s in ranges}))
print("busy per lane, read from the profiler:",
      {k: f"{v:.0%}" for k, v in overlap_metrics(ranges)["busy"].items()})

# %%
tmp.cleanup()
