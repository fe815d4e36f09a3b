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
# # 03 · Offloading and streaming: three lanes over a block store
#
# Tutorial 02 showed that ZO2 visits each transformer block **once per step**. That is what
# lets ZO2 (arXiv 2503.12668, Sec. 3.1 and 3.3) keep the blocks *off* the device: each block
# is uploaded, computed on (update, `+eps` pass, `−eps` pass, restore) and written back, and
# three CUDA streams overlap the **upload** of block `i+1`, the **compute** of block `i` and the
# **offload** of block `i−1`. `distzo2_lab` does the same over a *store* of fp32 block masters
# (host memory or a directory on disk). Without a GPU the lanes are threads; the picture, and
# the arithmetic, are the same.

# %% [markdown]
# ## What you will see
#
# 1. **Streaming by hand**: one working buffer, blocks read from a store one at a time, and the
#    logits equal the fully built model's bit for bit.
# 2. **The streamer** trains with the blocks resident, in host memory and on disk: per-step
#    losses and final digests are identical.
# 3. The runs' **span events** as timelines (one row per lane) and a table of overlap metrics.
# 4. **Prefetch depth** 0, 1, 3 over a *simulated* slow link: how much transfer time hides under
#    compute, and what happens when the link is slower than the compute.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
STEPS = 3 if SIZE == "tiny" else 30  # training steps per run (7 runs)
BATCH, SEQ = (4, 16) if SIZE == "tiny" else (8, 32)  # more tokens per step = more compute per block
LINK_GBPS = 0.1  # simulated link (GB/s): a 0.2 MB block takes ~2 ms, under a block's compute
THREADS = 1  # torch threads: the upload and offload lanes are threads too and need a core

# %%
import tempfile

import plotly.io as pio
import torch

pio.renderers.default = "plotly_mimetype+notebook"  # works offline in Jupyter Lab / Notebook
torch.set_num_threads(THREADS)
tmp = tempfile.TemporaryDirectory(prefix="distzo2-tutorial-")
BASE = {"model": "tiny-deep", "init_seed": 0}  # 8 transformer blocks: enough to stream

# %% [markdown]
# ## 1. Streaming blocks by hand
#
# `build_offloaded` builds the model with its transformer blocks as *layout only*: each block's
# bucket knows its parameter names and offsets, but holds no values. Only the resident buckets
# (embeddings and head) and one materialised **shell** block exist; every block runs through
# the shell. `values(key)` gives a bucket's starting values, a block generated from its own init
# seed into one reused buffer, so a store is written without the whole model ever in memory.

# %%
from distzo2_lab.offload.tiers import build_offloaded

adapter, values = build_offloaded(BASE)
for b in adapter.buckets:
    where = "values here" if b.master is not None else "layout only: values live in a store"
    print(f"{b.key:8s} {b.numel:>7,} parameters, {where}")
print(f"{len(adapter.layers)} layers, {len({id(m) for m in adapter.layers})} module object (the shell)")

# %% [markdown]
# A `HostStore` keeps one flat fp32 tensor per block in CPU memory (pinned when the device is a
# GPU). `read_into` is the upload; `write_from` the offload.

# %%
from distzo2_lab.offload.store import HostStore

store = HostStore([b.key for b in adapter.blocks], [b.numel for b in adapter.blocks])
for i, b in enumerate(adapter.blocks):
    store.blocks[i].copy_(values(b.key))
print(f"{len(store.numels)} blocks of {store.nbytes(0):,} bytes each in the store")

# %% [markdown]
# Now walk the blocks ourselves, with one working buffer: read block `i` into it, `attach` it
# (the shell's parameters become views of the buffer, no copy), run the block, `detach`.

# %%
ids = torch.randint(4, adapter.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
buf = torch.empty(max(store.numels))  # the only block-sized memory we use
hidden, ctx = adapter.embed(ids)  # (B, T, C)
for i, block in enumerate(adapter.blocks):
    view = buf[: block.numel]
    store.read_into(i, view)  # upload
    block.attach(view)  # shell parameters -> views of the buffer
    hidden = adapter.run_block(i, hidden, ctx)  # compute: (B, T, C) -> (B, T, C)
    block.detach()  # a forward changes nothing, so there is nothing to offload
logits = adapter.head(hidden)  # (B, T, V)

# %% [markdown]
# The oracle is the fully built model (`build_adapter`), every block resident:

# %%
from distzo2_lab.run.train import build_adapter

resident = build_adapter(BASE)
print("streamed logits equal the resident model's bit for bit:", torch.equal(logits, resident.forward(ids)))
print(f"block memory: {buf.numel() * 4:,} bytes streamed vs {sum(store.numels) * 4:,} bytes resident")

# %% [markdown]
# ## 2. The streamer
#
# Training does the same walk through a `Streamer` with three lanes:
#
# * **upload** reads block visits into a pool of `prefetch + 2` working buffers, up to
#   `prefetch` visits ahead of compute, and never reads a block whose previous write-back is
#   still in flight (write before re-read);
# * **compute** is the ZO2 engine's visit: deferred update, `z` once, dual forward, restore;
# * **offload** writes each block back in order and returns its buffer to the pool.
#
# `OffloadConfig(tier=...)` picks where the blocks live. The disk tier needs a store directory.

# %%
from distzo2_lab.config import OffloadConfig, TrainConfig, replace
from distzo2_lab.run.train import train

cfg = TrainConfig(model="tiny-deep", steps=STEPS, batch_size=BATCH, seq_len=SEQ, threads=THREADS)
TIERS = {"resident": OffloadConfig(), "host": OffloadConfig(tier="host"),
         "disk": OffloadConfig(tier="disk", store=f"{tmp.name}/store")}


def run(name, offload):
    """Train `cfg` with this offload config; spans go to tmp/<name>/rank0.jsonl."""
    return train(replace(cfg, offload=offload), trace=f"{tmp.name}/{name}", progress=False)


summaries = {name: run(name, offload) for name, offload in TIERS.items()}

# %%
for name, s in summaries.items():
    print(f"{name:8s} l+ {[round(r['loss_plus'], 5) for r in s['steps'][:4]]} ... "
          f"digest {s['digest'][:16]}  {s['seconds']:.2f} s")
ref = summaries["resident"]
for name in ("host", "disk"):
    s = summaries[name]
    print(f"{name}: same per-step results as resident: {s['steps'] == ref['steps']}, "
          f"same digest: {s['digest'] == ref['digest']}")

# %% [markdown]
# The streamer moves bytes, not arithmetic: every tier runs the same operations on the same fp32
# values, so the runs agree exactly. The disk store is a directory: `manifest.json`, one
# two-slot file per bucket, and (here) the live seed log. Each slot starts with a header naming
# the step it holds; a visit writes the slot that is *not* committed, and the manifest moves to
# a step only after that step's seed-log record is written (see `docs/offload.md`). A slot
# holding step `s` holds the block with the updates of steps `< s` applied: the committed slot
# (`STEPS − 1`) plus the seed log's last record is a complete state; the other slot holds the
# final flush, written but not committed.

# %%
import json

from distzo2_lab.offload.store import DiskStore

print(sorted(os.listdir(f"{tmp.name}/store")))
disk = DiskStore(f"{tmp.name}/store")
print({k: disk.manifest[k] for k in ("format", "version", "dtype", "committed")})
print("block.0 slots hold steps", [disk.slot_step("block.0", slot) for slot in (0, 1)])
disk.close()

# %% [markdown]
# ## 3. Reading the spans back
#
# With `trace=DIR`, every lane records spans `(rank, lane, phase, step, block, start, end,
# bytes)` and `train` writes them as `rank0.jsonl` plus a Chrome trace `rank0.trace.json` (open
# it in https://ui.perfetto.dev). The same list feeds the plots below.

# %%
from distzo2_lab.observe.events import read_jsonl

spans = {name: read_jsonl(f"{tmp.name}/{name}/rank0.jsonl") for name in TIERS}
for name, sp in spans.items():
    lanes = {lane: sum(s.lane == lane for s in sp) for lane in ("upload", "compute", "offload")}
    print(f"{name:8s} {len(sp):5d} spans {lanes}")
print(spans["disk"][0])

# %% [markdown]
# `compare_timelines` stacks the runs, each starting at 0 s; hover over a bar for its phase,
# step, block, bytes and duration. The resident run has only a compute lane.

# %%
from distzo2_lab.observe.viz import compare_timelines, metrics_table, timeline_figure

compare_timelines(spans, title=f"tiny-deep, {STEPS} steps: resident / host / disk").show()
metrics_table(spans, title="lane busy fractions and transfer time hidden under compute").show()

# %% [markdown]
# Zoom on one training step of the disk run with `window=(t0, t1)`: the upload of block `i+1`
# runs while block `i` computes, and block `i−1` is written back meanwhile.

# %%
one = [s for s in spans["disk"] if s.step == 1 and s.lane == "compute"]
window = (min(s.start for s in one) / 1e9, max(s.end for s in one) / 1e9)
timeline_figure(spans["disk"], title="disk tier, step 1", window=window).show()

# %% [markdown]
# ## 4. Prefetch depth and a slow link
#
# Host memory on this machine is far faster than a PCIe link, so the transfers above are tiny.
# `OffloadConfig(link_gbps=X)` **simulates** a link of `X` GB/s: each transfer is stretched to
# `bytes / X`. The trace records it (`otherData.simulated_link_gbps`), so a simulated timeline
# is never mistaken for a measured one. Three prefetch depths at `LINK_GBPS`, then a link ten
# times slower:

# %%
LINKS = {f"prefetch {d}": OffloadConfig(tier="host", prefetch=d, link_gbps=LINK_GBPS) for d in (0, 1, 3)}
LINKS["prefetch 3, slow link"] = OffloadConfig(tier="host", prefetch=3, link_gbps=LINK_GBPS / 10)
slow = {name: run(f"link{i}", offload) for i, (name, offload) in enumerate(LINKS.items())}
with open(f"{tmp.name}/link0/rank0.trace.json") as fh:
    print("trace metadata:", json.load(fh)["otherData"])

# %%
print(f"{'run':22s} {'s/step':>7s} {'upload':>7s} {'compute':>8s} {'hidden':>7s}  same digest")
for name, s in slow.items():
    m = s["overlap"]
    print(f"{name:22s} {s['seconds'] / STEPS:7.3f} {m['busy']['upload']:7.0%} {m['busy']['compute']:8.0%} "
          f"{m['hidden_fraction']:7.0%}  {s['digest'] == ref['digest']}")

# %% [markdown]
# * **prefetch 0**: the upload lane starts a block only when compute asks for it, so compute
#   waits for every upload (a staircase: upload, compute, upload, ...). Longest step, little
#   transfer time hidden.
# * **prefetch 1**: block `i+1` uploads while block `i` computes (ZO2's three-lane schedule):
#   most transfer time hides and the step gets shorter.
# * **prefetch 3**: the lane may run three visits ahead (`3 + 2` working buffers). With a link
#   faster than the compute, one block ahead is already enough; depth only absorbs jitter.
# * **slow link**: once a transfer takes longer than a block's compute, no depth helps: the
#   upload lane is busy all the time and compute waits for it. More compute per byte (longer
#   sequences, bigger batches) moves such a run back to compute-bound.
#
# "hidden" stays below 100% even at its best: a transfer counts as hidden only while a compute
# span runs, and the engine's work between spans (handing buffers between the lanes) is not a span.

# %%
slow_spans = {name: read_jsonl(f"{tmp.name}/link{i}/rank0.jsonl") for i, name in enumerate(slow)}
first = slow_spans["prefetch 0"]
t_end = (max(s.end for s in first if s.step <= 1) - min(s.start for s in first)) / 1e9
compare_timelines(slow_spans, title=f"simulated link {LINK_GBPS} GB/s: first steps",
                  window=(0.0, t_end)).show()
metrics_table(slow_spans, title="prefetch depth vs hidden transfer time (simulated link)").show()

# %%
tmp.cleanup()
