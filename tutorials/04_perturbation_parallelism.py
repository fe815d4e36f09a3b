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

# %%

# %% [markdown]
# # 04 · Perturbation parallelism: +eps on one rank, −eps on the other
#
# A ZO2 step runs two forwards on the same micro-batch: one with `θ + eps z`, one with
# `θ − eps z`. DistZO2 (arXiv 2507.03211, Sec. 3) splits that pair over two ranks:
# **perturbation parallelism** (PertP). Both ranks draw the same step seed, so the same `z`,
# without communicating; each runs *one* of the two forwards, and the ranks swap the single
# loss each computed. Every rank still applies the whole round trip to its own copy of the
# weights, so the two copies stay identical. Here the ranks are two real processes on the CPU
# in one gloo group, started from this notebook.

# %% [markdown]
# ## What you will see
#
# 1. **A PertP pair by hand**: a small worker that builds the process groups, the engine with
#    its rank's sign and the loss exchange, launched on two processes and checked bit for bit
#    against a one-rank run.
# 2. **The convenience wrapper**: `launch(train_worker, 2, ...)` with a `Layout(pert=2)`, and
#    the per-step losses arriving live through `on_event`.
# 3. Why the worker must be **importable**: a function defined here is refused, with the reason.
# 4. **Bit-exact with one rank**: the same weight digest and the same per-step `l+`, `l−`, `g`
#    as the single-rank `train()`, with only 32 bytes per rank crossing per step.
# 5. The two ranks' **timelines**: each runs one forward per step, and one exchange.
# 6. Beyond the paper, **n-SPSA**: two perturbation directions per step on four ranks, one
#    (direction, sign) per rank, bit-exact with the single-rank two-direction run.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
STEPS = 4 if SIZE == "tiny" else 20  # training steps per run (one 2-rank run, one single-rank run)
NSPSA_STEPS = 2 if SIZE == "tiny" else 10  # steps of the n-SPSA runs (one 4-rank run, one single-rank run)
BATCH, SEQ = 4, 12  # sequences per step, tokens per sequence
THREADS = 1  # torch threads per rank: two ranks share this machine's cores
TIMEOUT = 300  # seconds before the launcher stops the workers

# %%
import tempfile

import plotly.io as pio
import torch

pio.renderers.default = "plotly_mimetype+notebook"  # works offline in Jupyter Lab / Notebook
torch.set_num_threads(THREADS)
tmp = tempfile.TemporaryDirectory(prefix="distzo2-tutorial-")

# %% [markdown]
# ## 1. A PertP pair by hand
#
# First the pieces, without the wrapper. `pertp_pair_worker` (in `distzo2_lab.parallel.by_hand`,
# an importable module) is one rank: it joins the gloo process group, cuts its groups from the
# (dp × pert) grid with `ParallelGroups.build`, builds the tiny model's adapter and a `ZO2Engine`
# told this rank's sign and given a `LossExchange` over the pair's group, then runs a few steps:

# %%
import inspect

from distzo2_lab.parallel import by_hand

print(inspect.getsource(by_hand.pertp_pair_worker))

# %% [markdown]
# `launch` starts it on two processes; `by_hand.one_rank` runs the same steps in this process
# with both signs on one rank (ZO2's dual forward):

# %%
from distzo2_lab.parallel.launch import launch

pair = launch(by_hand.pertp_pair_worker, 2, args=(STEPS,), timeout=TIMEOUT).wait()
ref = by_hand.one_rank(STEPS)
for r in (0, 1):
    print(f"rank {r}: (dp, pert) = {pair[r]['coords']}, runs the {'+eps' if pair[r]['signs'][0] else '-eps'} pass")
print("both ranks' l+, l-, g == one rank's, bit for bit:", pair[0]["steps"] == pair[1]["steps"] == ref["steps"])
print("both ranks' weights == one rank's:", {p["digest"] for p in pair.values()} == {ref["digest"]})
print("bytes each rank sends per step:", pair[0]["exchange_bytes"])

# %% [markdown]
# Each sign is computed by exactly one rank and the exchange hands it to the other unchanged,
# so nothing is averaged: the pair is the one-rank run, bit for bit.
#
# ## 2. The same with `train_worker`
#
# `train_worker` builds the same pieces from a `TrainConfig` and a `Layout`, and adds the
# training loop's extras (seed log, traces, offload tiers, live events).
#
# `Layout(dp=1, pert=2)` is a 1 × 2 mesh: rank 0 runs `+eps`, rank 1 runs `−eps`.
# `validate_layout` checks it against the world size and the batch here, before any process
# starts (`train_worker` checks it again in every rank; `launch()` knows nothing of layouts).

# %%
from distzo2_lab.config import TrainConfig, ZOConfig
from distzo2_lab.parallel.layout import Layout, validate_layout

cfg = TrainConfig(model="tiny", steps=STEPS, batch_size=BATCH, seq_len=SEQ, threads=THREADS,
                  zo=ZOConfig())
layout = validate_layout(Layout(dp=1, pert=2), 2, cfg.batch_size)
for r in range(layout.world_size):
    plus, minus = layout.signs(r)
    passes = " and ".join(p for p, on in (("+eps", plus), ("-eps", minus)) if on)
    print(f"rank {r}: coords (dp, pert) = {layout.coords(r)}, runs the {passes} pass")

# %% [markdown]
# `launch` spawns the processes and returns a `RunHandle` at once; `wait(on_event=...)` blocks
# until they end, calling `on_event(rank, payload)` for every event as it arrives. Rank 0 of
# `train_worker` sends one per step, with the losses already combined over the ranks.

# %%
from distzo2_lab.run.worker import train_worker


def show(rank, ev):
    if isinstance(ev, dict) and "step" in ev:  # one per step from rank 0, combined over the ranks
        print(f"[rank {rank}] step {ev['step']}: l+ {ev['loss_plus']:.5f}  l- {ev['loss_minus']:.5f}  "
              f"g {ev['projected_grad']:+.4f}")
    else:  # a worker's log line ({"log": text}) or any other event
        print(f"[rank {rank}] {ev.get('log', ev) if isinstance(ev, dict) else ev}")


handle = launch(train_worker, 2, args=(cfg, layout, None, f"{tmp.name}/pertp"), timeout=TIMEOUT)
results = handle.wait(on_event=show)
print("exit codes:", handle.exitcodes)

# %% [markdown]
# ## 3. The worker must be importable
#
# `launch` uses the `spawn` start method: each worker is a fresh Python that *imports* the
# function it runs. `train_worker` lives in `distzo2_lab.run.worker`, so that works. A function
# defined in this notebook lives in `__main__`, which a spawned process cannot import, so
# `launch` refuses it before starting anything:

# %%
from distzo2_lab.config import ConfigError


def my_worker(rank, world_size, q):
    return rank


try:
    launch(my_worker, 2)
except ConfigError as err:
    print("refused:", err)

# %% [markdown]
# Put such a worker in a `.py` module next to the notebook and import it from there.
#
# ## 4. Bit-exact with the single-rank engine
#
# The same config on one process, both signs on one rank (ZO2's dual forward):

# %%
from distzo2_lab.run.train import train

single = train(cfg, progress=False, trace=f"{tmp.name}/single")
print("rank 0 digest == single-rank digest:", results[0]["digest"] == single["digest"])
print("rank 1 digest == single-rank digest:", results[1]["digest"] == single["digest"])
print("per-step l+, l-, g equal to the single rank's:", results[0]["steps"] == single["steps"])
print("exchange bytes per rank per step:", results[0]["exchange_bytes"], results[1]["exchange_bytes"])

# %% [markdown]
# A sign only one rank computed keeps that rank's value exactly, and the arithmetic on the
# weights is the same on both ranks as on one, so nothing is averaged and nothing drifts. The
# exchange is four float64 numbers per rank, `(l+, l−, tokens behind l+, tokens behind l−)`,
# with the sign a rank did not run sent as NaN with 0 tokens: **32 bytes**, whatever the model size.

# %%
for r in (0, 1):
    print(f"rank {r}: l+ {[round(s['loss_plus'], 5) for s in results[r]['steps']]}")
print(f"single: l+ {[round(s['loss_plus'], 5) for s in single['steps']]}")

# %% [markdown]
# ## 5. Timelines
#
# With `trace=DIR` every rank writes `rank<R>.jsonl` there. Each rank's times start at its own
# clock origin (the ranks' timelines are not aligned to each other).

# %%
from distzo2_lab.observe.events import read_jsonl

spans = {r: read_jsonl(f"{tmp.name}/pertp/rank{r}.jsonl") for r in (0, 1)}
for r, sp in spans.items():
    phases = sorted({(s.lane, s.phase) for s in sp})
    print(f"rank {r}: {len(sp)} spans, (lane, phase): {phases}")

# %% [markdown]
# Count the `forward` spans (one per block per pass) per step: each PertP rank runs **one**
# pass per block, where the single rank runs two (its dual forward). The single run was traced too.

# %%
spans["single"] = read_jsonl(f"{tmp.name}/single/rank0.jsonl")
n_blocks = len({s.block for s in spans["single"] if s.phase == "forward"})
for name, sp in spans.items():
    fwd = sum(s.phase == "forward" for s in sp)
    label = name if name == "single" else f"rank {name}"
    print(f"{label:6s}: {fwd / (STEPS * n_blocks):.0f} forward pass(es) per block per step")
print("each PertP rank runs one pass:",
      all(sum(s.phase == "forward" for s in spans[r]) == STEPS * n_blocks for r in (0, 1)))

# %%
from distzo2_lab.observe.viz import compare_timelines

compare_timelines({(f"rank {r}" if r != "single" else "single rank"): sp for r, sp in spans.items()},
                  title=f"PertP(2) ranks vs one rank, tiny OPT, {STEPS} steps").show()

# %% [markdown]
# On the tiny model the PertP steps are longer than the single rank's: every step waits for the
# two scalar losses to be exchanged, and on a model this small that wait costs more than the
# half of the forwards each rank saves. The saved forwards grow with the model; the wait does not.

# %% [markdown]
# ## 6. Several directions per step (n-SPSA)
#
# MeZO's n-SPSA variant averages `q` directions per step:
# `θ ← θ − (lr/q) Σ_j g_j z_j`, each `z_j` drawn from its own seed `direction_seed(seed, j)`.
# With `zo.directions=2`, `Layout(dp=1, pert=4)` runs one (direction, sign) per rank: ranks 0
# and 1 are direction 0's pair, ranks 2 and 3 direction 1's. With `q > 1` the forwards run on
# perturbed *copies* `θ ± eps z_j`: the masters only ever receive the update, so every rank
# keeps them exact whichever directions it ran.

# %%
import dataclasses

from distzo2_lab.plan.planner import plan_text

cfg_q = dataclasses.replace(cfg, steps=NSPSA_STEPS, zo=ZOConfig(directions=2))
layout_q = validate_layout(Layout(dp=1, pert=4), 4, cfg_q.batch_size, directions=2)
print(plan_text(layout_q, cfg_q.batch_size, directions=2, model="tiny"))

# %% [markdown]
# A real 4-rank launch, and the same config on one rank, which runs both directions and both
# signs itself:

# %%
handle = launch(train_worker, 4, args=(cfg_q, layout_q, f"{tmp.name}/nspsa"), timeout=TIMEOUT)
nspsa = handle.wait()
single_q = train(cfg_q, progress=False)
print("exit codes:", handle.exitcodes)
print("all 4 digests == single-rank q=2 digest:", {r["digest"] for r in nspsa.values()} == {single_q["digest"]})
print("per-step l+, l-, g equal to the single rank's:", nspsa[0]["steps"] == single_q["steps"])
print("exchange bytes per rank per step (4 float64 x 2 directions):", nspsa[0]["exchange_bytes"])

# %% [markdown]
# Each (direction, sign) is computed by exactly one rank and nothing is averaged across ranks,
# so the run is bit-exact, as PertP is. The step's `l+`, `l−`, `g` are means over the
# directions; rank 0's seed log keeps every direction's `(seed_j, g_j)` as `terms`, and
# replaying it applies the updates only (no perturbation round trip):

# %%
import json

from distzo2_lab.run.checkpoint import digest
from distzo2_lab.run.train import rebuild

with open(f"{tmp.name}/nspsa/seedlog.jsonl") as f:
    first = json.loads(f.readlines()[1])  # line 0 is the header (base model, zo config)
print("step 0: g =", round(first["grad"], 5), " terms (seed_j, g_j):", [(s, round(g, 5)) for s, g in first["terms"]])
print("rebuilt from the seed log == the ranks' digest:",
      digest(rebuild(f"{tmp.name}/nspsa/seedlog.jsonl")) == nspsa[0]["digest"])

# %%
tmp.cleanup()
