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
# # 06 · 2D parallelism and hardware-aware slicing
#
# The two splits of tutorials 04 and 05 combine: a **2D** mesh `Layout(dp=2, pert=2)` has four
# ranks; rank `(d, 0)` runs `+eps` on micro-batch `d`, rank `(d, 1)` runs `−eps` on the same
# rows. With the blocks **offloaded** (tutorial 03) every rank would still move every whole
# block between the store and its working buffer. DistZO2's **slicing** (arXiv 2507.03211)
# cuts each block into one shard per rank: a rank uploads, updates and writes back only its
# shard, and the ranks **all-gather** the shards into the whole block before the forwards.

# %% [markdown]
# ## What you will see
#
# 1. The dry-run plan of the 2 × 2 layout, naive and sliced.
# 2. **The 2D mesh by hand**: a small worker with the grid's groups, the slicer over the world
#    group and the two-stage loss exchange, checked against one rank.
# 3. Two 4-rank runs launched from the notebook, host tier, naive vs sliced: **bit-identical**
#    weight digests and per-step losses.
# 4. **Upload bytes per rank** from the spans: about a quarter with slicing.
# 5. Each rank's lanes as timelines, naive vs sliced, with the `allgather` spans on the
#    exchange lane.
# 6. **One host store per node**: the four ranks share one copy of the blocks in shared
#    memory; the memory report per node.
# 7. The **disk tier with several ranks**: one store directory, each rank reading and writing
#    its shard, the node's first rank committing every step.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
STEPS = 2 if SIZE == "tiny" else 10  # training steps per run (two 4-rank runs, one 2-rank disk run)
BATCH, SEQ = 4, 12  # global batch (2 rows per dp group), tokens per sequence
THREADS = 1  # torch threads per rank: four ranks share this machine's cores
TIMEOUT = 300  # seconds before the launcher stops the workers

# %%
import tempfile

import plotly.io as pio
import torch

pio.renderers.default = "plotly_mimetype+notebook"  # works offline in Jupyter Lab / Notebook
torch.set_num_threads(THREADS)
tmp = tempfile.TemporaryDirectory(prefix="distzo2-tutorial-")

# %% [markdown]
# ## 1. The plan

# %%
from distzo2_lab.plan.planner import plan_text
from distzo2_lab.parallel.layout import Layout, validate_layout

LAYOUTS = {"naive": Layout(dp=2, pert=2), "sliced": Layout(dp=2, pert=2, slice=True)}
for layout in LAYOUTS.values():
    print(plan_text(validate_layout(layout, 4, BATCH), BATCH, model="tiny"), end="\n\n")

# %% [markdown]
# ## 2. The 2D mesh by hand
#
# `mesh_worker` (in `distzo2_lab.parallel.by_hand`) is one rank of the 2 × 2 grid.
# `ParallelGroups.build` cuts the rows (pert groups: one micro-batch, `+eps` and `−eps`) and the
# columns (dp groups: one sign, two micro-batches) from the grid. The blocks live on the host
# tier; a `Slicer` over the world group has each rank upload one shard of every block and
# all-gather the rest. The `LossExchange` runs in two stages: the pert pair fills in the sign
# each rank did not run, then the dp group averages its micro-batches.

# %%
import inspect

from distzo2_lab.parallel import by_hand

print(inspect.getsource(by_hand.mesh_worker))

# %%
from distzo2_lab.parallel.launch import launch

mesh = launch(by_hand.mesh_worker, 4, args=(STEPS,), timeout=TIMEOUT).wait()
ddp = launch(by_hand.ddp_worker, 2, args=(STEPS,), timeout=TIMEOUT).wait()
ref = by_hand.one_rank(STEPS)
for r in range(4):
    print(f"rank {r}: (dp, pert) = {mesh[r]['coords']}, runs the {'+eps' if mesh[r]['signs'][0] else '-eps'} pass")
print("all 4 ranks hold the same weights:", len({m["digest"] for m in mesh.values()}) == 1)
print("2D sliced == DDP(2) by hand, bit for bit:", mesh[0]["steps"] == ddp[0]["steps"]
      and mesh[0]["digest"] == ddp[0]["digest"])
rel, dg = by_hand.max_differences(mesh[0]["steps"], ref["steps"])
print(f"against one rank: l+- {rel:.1e} relative, g {dg:.1e} absolute; within float order:", rel < 1e-5 and dg < 5e-3)

# %% [markdown]
# Splitting the signs over a pair changes no number (each sign keeps its rank's value), and the
# slicer's arithmetic per element is the unsliced one: the 2D run is DDP's, bit for bit, and
# DDP differs from one rank by float order only (tutorial 05).

# %% [markdown]
# ## 3. Naive vs sliced
#
# Both runs use the host tier: the blocks live in host memory (one copy for the node's ranks,
# section 6) and each rank streams them through its upload / compute / offload lanes.
# `train_worker` is importable, as `launch` needs (a worker defined in the notebook is refused:
# see tutorial 04).

# %%
from distzo2_lab.config import OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.run.worker import train_worker

cfg = TrainConfig(model="tiny", steps=STEPS, batch_size=BATCH, seq_len=SEQ, threads=THREADS,
                  zo=ZOConfig(), offload=OffloadConfig(tier="host"))
results = {}
for name, layout in LAYOUTS.items():
    handle = launch(train_worker, 4, args=(cfg, layout, None, f"{tmp.name}/{name}"), timeout=TIMEOUT)
    results[name] = handle.wait()
    print(f"{name}: exit codes {handle.exitcodes}, digest {results[name][0]['digest'][:16]}")

# %%
naive, sliced = results["naive"], results["sliced"]
print("all 8 ranks hold the same weights:",
      len({r["digest"] for res in results.values() for r in res.values()}) == 1)
print("sliced digest == naive digest:", sliced[0]["digest"] == naive[0]["digest"])
print("sliced per-step l+, l-, g == naive:", sliced[0]["steps"] == naive[0]["steps"])

# %% [markdown]
# Per element the sliced arithmetic is the naive one (the pending update is applied to a
# shard with `z` regenerated for that shard only), so the runs agree bit for bit.

# %% [markdown]
# ## 4. Bytes moved per rank
#
# Every rank wrote `rank<R>.jsonl`. A rank's upload bytes are the sum of `bytes` over its spans
# on the `upload` lane; the all-gathers are `phase="allgather"` spans on the `exchange` lane.

# %%
from distzo2_lab.observe.events import read_jsonl

spans = {name: {r: read_jsonl(f"{tmp.name}/{name}/rank{r}.jsonl") for r in range(4)} for name in LAYOUTS}


def lane_bytes(sp, lane, phase=None):
    return sum(s.bytes for s in sp if s.lane == lane and (phase is None or s.phase == phase))


for r in range(4):
    up = {name: lane_bytes(spans[name][r], "upload") for name in LAYOUTS}
    ag = lane_bytes(spans["sliced"][r], "exchange", "allgather")
    print(f"rank {r}: upload naive {up['naive']:>9,}  sliced {up['sliced']:>9,} "
          f"({up['sliced'] / up['naive']:.0%})  all-gathered {ag:,} bytes")

# %%
up0 = {name: lane_bytes(spans[name][0], "upload") for name in LAYOUTS}
print("rank 0 uploads less when sliced:", up0["sliced"] < up0["naive"])
print("allgather spans only in the sliced run:",
      any(s.phase == "allgather" for s in spans["sliced"][0])
      and not any(s.phase == "allgather" for s in spans["naive"][0]))

# %% [markdown]
# A shard is a quarter of a block, rounded up: the noise is a function of each element's index,
# so a shard's `z` starts anywhere and needs no alignment, and every rank moves the same share.
#
# ## 5. Timelines
#
# Each rank's spans start at its own clock origin; `compare_timelines` shifts every run to 0 s.
# Rank 0, naive over sliced: the sliced upload bars are shorter, and the grey `allgather` bars
# on the exchange lane put the whole block together before the forwards.

# %%
from distzo2_lab.observe.viz import compare_timelines

compare_timelines({f"{name} rank0": spans[name][0] for name in LAYOUTS},
                  title=f"2D (2 x 2), host tier, rank 0: naive vs sliced, {STEPS} steps").show()

# %% [markdown]
# All four ranks of both runs, one row per rank and lane:

# %%
compare_timelines({f"{name} rank{r}": spans[name][r] for name in LAYOUTS for r in range(4)},
                  title="every rank's lanes: naive vs sliced").show()

# %% [markdown]
# ## 6. One host store per node
#
# The ranks of a node do not each keep a copy of the blocks: the node's first rank writes them
# into one `/dev/shm` file that every rank maps, and removes its name once all have mapped it.
# Sliced ranks touch only their own shards, so one slot per block is enough; naive ranks keep
# two slots per block (a slow rank must not read a block that a faster rank already updated).
# Every rank reported its memory; `node_memory` adds it up per node:

# %%
from distzo2_lab.run.worker import node_memory

for name in LAYOUTS:
    for node, m in node_memory(results[name]).items():
        print(f"{name}: {m['ranks']} ranks on {node}: shared store {m['shared_store_mb']:.2f} MiB once, "
              f"private {m['private_mb']:.0f} MiB, total {m['total_mb']:.0f} MiB "
              f"(one store per rank: {m['copy_per_rank_mb']:.0f} MiB)")
sliced_store = next(iter(node_memory(sliced).values()))["shared_store_mb"]
naive_store = next(iter(node_memory(naive).values()))["shared_store_mb"]
print("sliced: one slot per block, naive: two:", naive_store == 2 * sliced_store)
print("nothing left in /dev/shm:", not [f for f in os.listdir("/dev/shm") if f.startswith("distzo2-")])

# %% [markdown]
# On the tiny model the blocks are a small part of a rank's memory (the Python process and
# torch are most of it); on a large model they are most of it, and sharing saves
# `(ranks − slots) ×` the blocks' size per node.
#
# ## 7. The disk tier with several ranks
#
# With `offload.tier="disk"` every rank of the node uses the one store directory: a sliced rank
# reads and writes only its shard of each block file. After each step all ranks drain their
# lanes and meet at a barrier; then the node's first rank writes the resident buckets and moves
# the manifest to the step, and it alone writes the seed log. A PertP(2) sliced run on disk
# equals the single-rank run bit for bit:

# %%
import dataclasses
import json

from distzo2_lab.run.train import train

disk_cfg = dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=f"{tmp.name}/store"))
disk_layout = validate_layout(Layout(dp=1, pert=2, slice=True), 2, BATCH)
handle = launch(train_worker, 2, args=(disk_cfg, disk_layout), timeout=TIMEOUT)
disk = handle.wait()
one = train(dataclasses.replace(cfg, offload=OffloadConfig()), progress=False)  # one rank, resident
print("exit codes:", handle.exitcodes)
print("both disk ranks == the single-rank digest:", {r["digest"] for r in disk.values()} == {one["digest"]})
print("per-step l+, l-, g equal:", disk[0]["steps"] == one["steps"])

# %%
with open(f"{tmp.name}/store/manifest.json") as f:
    print("manifest committed the last step:", json.load(f)["committed"] == STEPS - 1)
with open(f"{tmp.name}/store/seedlog.jsonl") as f:
    print("seed log lines (header + one per step, one writer):", len(f.readlines()))
print("store files:", sorted(os.listdir(f"{tmp.name}/store")))

# %%
tmp.cleanup()
