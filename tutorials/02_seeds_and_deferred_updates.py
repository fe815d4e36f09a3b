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
# # 02 · Seeds and deferred updates
#
# Tutorial 01 ran MeZO (arXiv 2305.17333): two forward passes at `θ ± eps z`, then
# `θ -= lr · g · z`. This tutorial looks at the two ideas that make the step cheap in memory
# and in data movement:
#
# * MeZO never stores `z`: it is a pure function of a **seed**, regenerated when needed. The
#   same trick turns a whole fine-tuning run into a tiny **seed log**.
# * ZO2 (arXiv 2503.12668, Sec. 3.2–3.3) visits each transformer block once per step. The update
#   of step `t` is only known after the last block, so it is **deferred** and applied on the
#   block's next visit, at step `t + 1`, with `z` regenerated from the seed of step `t`.

# %% [markdown]
# ## What you will see
#
# 1. `z` is **counter-based**: element `i` of bucket `key` at step seed `s` is a hash of
#    `(s, key, i)` turned into a Gaussian, so any slice at any start regenerates on its own, the
#    values are the same on CPU and GPU, and a seed costs 8 bytes where `z` costs 4 per parameter.
# 2. `ZO2Engine.step` leaves a `PendingUpdate` (seed, g, lr) in `engine.pending`; `flush()` and
#    `evaluate()` apply it, after which the weights are **bit-identical** to eager MeZO's.
# 3. A run's seed log rebuilds its weights exactly (same sha256 digest), is far smaller than the
#    model, and a run resumed from a checkpoint ends where an uninterrupted run ends.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
ZO2_STEPS = 3 if SIZE == "tiny" else 10  # steps of the ZO2 engine vs the eager reference
TRAIN_STEPS = 20 if SIZE == "tiny" else 200  # length of the checkpointed run (resumed halfway)
THREADS = 2  # torch threads; the full size needs well under two minutes on 2 cores

# %%
import torch

from distzo2_lab.run.train import build_adapter

torch.set_num_threads(THREADS)
base = build_adapter({"model": "tiny", "init_seed": 0})  # the starting weights, never trained
for b in base.buckets:
    print(f"{b.key:8s} {b.numel:>7,} parameters in one flat fp32 master")

# %% [markdown]
# ## 1. `z` is a function of a seed
#
# `Perturber.noise_for(seed, key, numel)` returns `z` of one parameter bucket. Ask twice, get the
# same tensor: nothing has to be kept between the `+eps`, `−2 eps`, `+eps` and update passes.

# %%
from distzo2_lab.zo.perturb import Perturber
from distzo2_lab.seeds import step_seed

perturber = Perturber("gaussian")
seed = step_seed(0, 7)  # the seed of step 7 of a run with run seed 0
block = base.blocks[0]
z = perturber.noise_for(seed, block.key, block.numel)
print(f"seed {seed}, z of {block.key}: {z[:4].tolist()} ...")
print("regenerated z is identical:", torch.equal(z, perturber.noise_for(seed, block.key, block.numel)))

# %% [markdown]
# Each bucket has its own `key`, each step its own seed, so the noise differs between them:

# %%
z_other_key = perturber.noise_for(seed, "block.1", block.numel)
z_other_step = perturber.noise_for(step_seed(0, 8), block.key, block.numel)
print(f"{block.key}, step 7: {z[:3].tolist()}")
print(f"block.1, step 7: {z_other_key[:3].tolist()}")
print(f"{block.key}, step 8: {z_other_step[:3].tolist()}")

# %% [markdown]
# ### How an element of `z` is made
#
# There is no generator: `noise_key(seed, key)` hashes the pair once into three 32-bit words, and
# element `i` is computed from `i` and those words alone (`zo/noise.py`): two rounds of a 32-bit
# integer hash of `i`'s pair give two words; their top 24 bits are two uniform numbers `u1`, `u2`,
# and Box-Muller turns them into two independent normals, `sqrt(-2 ln u1) cos(2 pi u2)` for the
# pair's first element and `sqrt(-2 ln u1) sin(2 pi u2)` for its second, `2**19` elements further
# (Rademacher noise takes the sign of one bit instead). A pass over a whole block computes both
# elements of a pair from one draw, half the work per element. `ln` and `cos` are written with
# `+ - * /` and `sqrt` only, which IEEE rounds exactly everywhere, so the CPU kernels (C++ built on
# first use, `zo/noise_kernels.cpp`), the Triton GPU kernel and plain torch give the same bits. Here the plain-torch definition next to
# the perturber:

# %%
from distzo2_lab.zo.noise import noise_key, noise_reference

words = noise_key(seed, block.key)
print("key words of (seed, block):", [hex(w) for w in words])
print("definition == perturber:", torch.equal(noise_reference("gaussian", words, 0, block.numel), z))
print(f"mean {z.mean():+.4f}, std {z.std():.4f} over {z.numel():,} elements; max |z| {z.abs().max():.3f}")
from distzo2_lab.zo.noise import PAIR

pair = noise_reference("gaussian", words, 0, 2 * PAIR)
first, second = pair[:3], pair[PAIR : PAIR + 3]
print("first elements of three pairs:", first.tolist(), "their partners:", second.tolist())
print("r = sqrt(first**2 + second**2) of each pair, one draw's radius:", (first**2 + second**2).sqrt().tolist())

# %% [markdown]
# Torch's global random state is neither read nor changed, so user code around the engine stays
# reproducible:

# %%
torch.manual_seed(123)
expected = torch.rand(3)
torch.manual_seed(123)
perturber.noise_for(seed, block.key, block.numel)
print("global RNG untouched:", torch.equal(torch.rand(3), expected))

# %% [markdown]
# ### Slices regenerate on their own
#
# Element `i` depends only on `(seed, key, i)`, so a worker that owns a slice of a bucket (a
# shard, DistZO2's slicing) generates its part of `z` without generating the rest, starting
# anywhere. This is also why the engine never writes `z` to memory: the pass that applies an
# update and makes the perturbed copies computes each element's `z` where it needs it.

# %%
for start, length in [(0, 1000), (12345, 777), (block.numel - 5, 5)]:
    part = perturber.noise_for(seed, block.key, length, start=start)
    print(f"z[{start}:{start + length}] alone equals the slice of the full z:",
          torch.equal(part, z[start : start + length]))

# %% [markdown]
# ### What storing `z` would cost
#
# `z` has one fp32 number per parameter; the seed is one 64-bit integer. For the tiny model
# and for OPT-13B (parameters counted on the `meta` device, nothing allocated):

# %%
from distzo2_lab.models import count_parameters

for name, n in [("tiny", sum(b.numel for b in base.buckets)), ("opt-13b", count_parameters("opt-13b"))]:
    print(f"{name:8s} {n:>15,} parameters: z takes {4 * n / 2**20:>10,.1f} MiB, the seed 8 bytes")

# %% [markdown]
# ## 2. The deferred update
#
# Two copies of the same base model: one driven by the ZO2 engine, one by the eager MeZO
# reference (tutorial 01). Both see the same batch and the same step seed.

# %%
from distzo2_lab.config import TrainConfig, ZOConfig
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO
from distzo2_lab.run.train import base_of, make_task

cfg = TrainConfig(model="tiny", seed=0, threads=THREADS, zo=ZOConfig())
zo2_model, ref_model = build_adapter(base_of(cfg)), build_adapter(base_of(cfg))
zo2 = ZO2Engine(zo2_model, cfg.zo, cfg.precision, threads=THREADS)
ref = EagerMeZO(ref_model, cfg.zo, cfg.precision, threads=THREADS)
task = make_task(cfg, zo2_model)

# %% [markdown]
# One ZO2 step returns the two losses and `g` — and leaves the update **pending**:

# %%
r = zo2.step(task.batch(0), step_seed(cfg.seed, 0))
print(r)
print("pending:", zo2.pending)

# %% [markdown]
# The weights have not moved yet: the passes read copies `θ + eps z` and `θ − eps z` that one
# fused pass per block writes, so the masters are exactly the base's (MeZO's literal in-place
# step, `ZOConfig(perturb="in-place")`, would leave the rounding of its `+eps, −2 eps, +eps` round
# trip, ~1e-7). An update would move them by `lr · |g| · |z|`, ~1e-2.

# %%
def max_diff(a, b):
    return max((x.master - y.master).abs().max().item() for x, y in zip(a.buckets, b.buckets))


print(f"max |zo2 - base| = {max_diff(zo2_model, base):.2e}")
print(f"size of the pending update, max lr*|g*z| = {r.lr * abs(r.grad) * z.abs().max().item():.2e}")

# %% [markdown]
# The eager reference applies its update at once, so now the two models differ by that update:

# %%
r_ref = ref.step(task.batch(0), step_seed(cfg.seed, 0))
print("same step result as ZO2:", r_ref == r)
print(f"max |zo2 - eager| before flush = {max_diff(zo2_model, ref_model):.2e}")

# %% [markdown]
# `flush()` applies the pending update to every bucket, regenerating `z` from its seed. The
# same arithmetic in the same order: the result is equal bit for bit, not merely close.

# %%
zo2.flush()
print("pending after flush:", zo2.pending)
print("bit-identical buckets:", [torch.equal(x.master, y.master)
                                 for x, y in zip(zo2_model.buckets, ref_model.buckets)])

# %% [markdown]
# In a run, step `t + 1` applies the pending update of step `t` on each block's visit, and a
# new update becomes pending. `evaluate()` flushes first, so it never reads stale weights.

# %%
for t in range(1, 1 + ZO2_STEPS):
    a = zo2.step(task.batch(t), step_seed(cfg.seed, t))
    b = ref.step(task.batch(t), step_seed(cfg.seed, t))
    print(f"step {t}: l+ {a.loss_plus:.6f}, l- {a.loss_minus:.6f}, g {a.grad:+.4f}; same as eager: {a == b}")
print("pending:", zo2.pending)

# %%
eval_batch = task.batch(10**9)
print(f"eval loss ZO2 {zo2.evaluate(eval_batch):.6f}, eager {ref.evaluate(eval_batch):.6f}")
print("pending after evaluate:", zo2.pending)
print("bit-identical buckets:", [torch.equal(x.master, y.master)
                                 for x, y in zip(zo2_model.buckets, ref_model.buckets)])

# %% [markdown]
# ### A bf16 master: the update's seed also rounds it
#
# `PrecisionConfig(master="bf16")` keeps the masters themselves in bf16 (half the host memory and
# half the bytes a host-tier visit moves). An update of `lr · g · z` at lr 1e-7 is far below a bf16
# ulp, so rounding to nearest would drop it. The fused pass computes the update in fp32 and rounds
# stochastically instead: a 16-bit integer from the same counter-based hash, keyed by the update's
# seed, is added to the bit pattern before the low half is dropped. An element lands on its upper
# neighbour with probability equal to its distance from the lower one, in ulps, so the mean move
# equals the update, and a replay of the seed log rounds the same way. Below: 100 000 weights of
# 1.0 receive `+ulp/10` from Rademacher noise.

# %%
from distzo2_lab.zo import noise

w = torch.ones(100_000, dtype=torch.bfloat16)
ulp = 2.0 ** -7  # bf16's spacing above 1.0
key = noise.noise_key(123, "demo")
noise.visit_(w, 0, "rademacher", [(key, ulp / 10)], round_key=noise.noise_key(123, "round/demo"))
z = noise.fill_(torch.empty(w.numel()), "rademacher", key, 0)
print(f"elements moved: {(w != 1).float().mean():.3f};  mean move along z / update: "
      f"{((w.float() - 1) * z).mean() / (ulp / 10):.3f};  round to nearest would move "
      f"{((torch.ones(w.numel()) + ulp / 10 * z).to(torch.bfloat16) != 1).float().mean():.3f}")

# %% [markdown]
# ## 3. Seed-log checkpoints
#
# Since `z` follows from the seed, a step is fully described by `(seed, g, lr)`. `train` writes
# one JSON line per step to `seedlog.jsonl` (after a header naming the base model and the ZO
# hyper-parameters), and `save=` writes a checkpoint directory with the weights as well.

# %%
import tempfile

from distzo2_lab.config import replace
from distzo2_lab.run.train import train

tmp = tempfile.TemporaryDirectory(prefix="distzo2-tutorial-")
run_cfg = replace(cfg, steps=TRAIN_STEPS)
summary = train(run_cfg, out=f"{tmp.name}/run", save=f"{tmp.name}/ckpt", progress=False)
print(f"eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}")
print(f"digest (sha256 of all weights) {summary['digest'][:16]}...")
for d in ("run", "ckpt"):
    print(f"{d}/:", sorted(os.listdir(f"{tmp.name}/{d}")))

# %%
seedlog = f"{tmp.name}/run/seedlog.jsonl"
with open(seedlog) as fh:
    for line in fh.readlines()[:3]:
        print(line.rstrip())

# %% [markdown]
# ### Rebuild the weights from base + seed log
#
# `rebuild` builds the base model named in the header and replays every record (its update, `z`
# regenerated; an in-place run's round trip too). The sha256 digest of the rebuilt weights equals training's.

# %%
from distzo2_lab.run.checkpoint import digest
from distzo2_lab.run.train import rebuild

rebuilt = rebuild(seedlog, threads=THREADS)
print(f"trained {summary['digest'][:16]}..., rebuilt {digest(rebuilt)[:16]}...")
print("equal:", digest(rebuilt) == summary["digest"])

# %% [markdown]
# ### How big is a seed log?
#
# A few dozen bytes per step, whatever the size of the model:

# %%
log_bytes = os.path.getsize(seedlog)
weights_bytes = os.path.getsize(f"{tmp.name}/ckpt/model.safetensors")
print(f"seed log: {log_bytes:,} bytes for {TRAIN_STEPS} steps ({log_bytes / TRAIN_STEPS:.0f} bytes/step)")
print(f"weights:  {weights_bytes:,} bytes (tiny model, fp32): {weights_bytes / log_bytes:.0f}x the seed log")
opt13b_gib = 2 * count_parameters("opt-13b") / 2**30
print(f"OPT-13B weights in fp16: {opt13b_gib:.1f} GiB; its seed log would be as small as this one")

# %% [markdown]
# ### Resume from a checkpoint
#
# Step seeds and batches are pure functions of `(run seed, step)`. A run stopped halfway and
# resumed from its checkpoint therefore ends with the same digest as the uninterrupted run.

# %%
half = TRAIN_STEPS // 2
train(replace(run_cfg, steps=half), save=f"{tmp.name}/half", progress=False)
resumed = train(run_cfg, resume=f"{tmp.name}/half", out=f"{tmp.name}/resumed", progress=False)
print(f"uninterrupted {summary['digest'][:16]}  resumed at step {half} {resumed['digest'][:16]}  "
      f"equal: {resumed['digest'] == summary['digest']}")

# %% [markdown]
# The resumed run's seed log holds all `TRAIN_STEPS` records, so it rebuilds the same weights too:

# %%
print("rebuilt from the resumed seed log:",
      digest(rebuild(f"{tmp.name}/resumed/seedlog.jsonl", threads=THREADS)) == summary["digest"])
tmp.cleanup()
