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
# # 01 · Zeroth-order optimisation: from SPSA to MeZO
#
# Zeroth-order (ZO) optimisation trains a model with **forward passes only**: no backward pass,
# no activations kept for it, no gradient buffers. This tutorial builds the idea up from a toy
# function to a real (tiny) OPT language model.
#
# Papers: MeZO — *Fine-Tuning Language Models with Just Forward Passes* (Malladi et al.,
# arXiv 2305.17333); ZO2 — *Scalable Zeroth-Order Fine-Tuning for Extremely Large Language
# Models with Limited GPU Memory* (arXiv 2503.12668), which tutorial 02 turns to.

# %% [markdown]
# ## What you will see
#
# 1. **SPSA** on a quadratic: two evaluations of `f` at `x ± eps z` give a scalar `g`, and
#    `x -= lr * g * z` is a descent step.
# 2. SPSA against true gradient descent: it converges, but needs a learning rate about
#    `d` times smaller.
# 3. The estimate `g z` is **unbiased**: the average of many of them points along the true
#    gradient (cosine similarity → 1).
# 4. **MeZO** on the tiny OPT through `distzo2_lab`: one step by hand, then a whole run with a
#    loss curve and the evaluation loss before and after.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
DIM = 20 if SIZE == "tiny" else 50  # dimension of the toy problem
TOY_STEPS = 300 if SIZE == "tiny" else 1500  # iterations of SPSA / gradient descent
N_ESTIMATES = 2_000 if SIZE == "tiny" else 20_000  # SPSA samples for the unbiasedness check
MEZO_STEPS = 40 if SIZE == "tiny" else 300  # MeZO steps on the tiny OPT
THREADS = 2  # torch threads; the full size needs well under two minutes on 2 cores

# %%
import plotly.graph_objects as go
import plotly.io as pio
import torch

pio.renderers.default = "plotly_mimetype+notebook"  # works offline in Jupyter Lab / Notebook
torch.set_num_threads(THREADS)

# %% [markdown]
# ## 1. A toy problem
#
# `f(x) = ½ Σ_i c_i (x_i − x*_i)²` with curvatures `c_i` spread from 1 to 10. We know its
# gradient `∇f(x) = c ⊙ (x − x*)`, so we can compare ZO with the real thing. (float64 keeps
# round-off out of the picture; MeZO itself runs in fp32.)

# %%
gen = torch.Generator().manual_seed(0)
curv = torch.linspace(1.0, 10.0, DIM, dtype=torch.float64)
x_star = torch.randn(DIM, generator=gen, dtype=torch.float64)


def f(x):  # x: (..., DIM) -> (...)
    return 0.5 * (curv * (x - x_star) ** 2).sum(-1)


def grad_f(x):  # the true gradient, for comparison only
    return curv * (x - x_star)


x0 = torch.zeros(DIM, dtype=torch.float64)
print(f"f(x0) = {f(x0):.3f}, f(x*) = {f(x_star):.3f}")

# %% [markdown]
# ## 2. One SPSA estimate
#
# Draw a random direction `z ~ N(0, I)` and evaluate `f` twice:
# `g = (f(x + eps z) − f(x − eps z)) / (2 eps)`. `g` is a *scalar*: the slope of `f` along
# `z`, i.e. the directional derivative `zᵀ∇f(x)` (exactly so for a quadratic).

# %%
EPS = 1e-3
z = torch.randn(DIM, generator=gen, dtype=torch.float64)
g = (f(x0 + EPS * z) - f(x0 - EPS * z)) / (2 * EPS)
print(f"SPSA  g       = {g:.6f}")
print(f"true  z . ∇f  = {z @ grad_f(x0):.6f}")

# %% [markdown]
# ## 3. SPSA descent vs gradient descent
#
# The ZO step moves along `z` by `lr · g`. Gradient descent (GD) uses the full gradient with the
# classic `lr = 1 / max curvature`. SPSA's step `g z` is noisy: its squared norm is about
# `(d + 2)` times that of the gradient, so its learning rate must be about that much smaller.

# %%
LR_GD = 1.0 / curv.max().item()
LR_ZO = LR_GD / (DIM + 2)


def run_spsa(lr, steps, seed=1):
    x, rng, hist = x0.clone(), torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        z = torch.randn(DIM, generator=rng, dtype=torch.float64)
        g = (f(x + EPS * z) - f(x - EPS * z)) / (2 * EPS)  # two function evaluations
        x -= lr * g * z
        hist.append(f(x).item())
    return hist


# %%
def run_gd(lr, steps):
    x, hist = x0.clone(), []
    for _ in range(steps):
        x -= lr * grad_f(x)  # one gradient evaluation
        hist.append(f(x).item())
    return hist


spsa_hist, gd_hist = run_spsa(LR_ZO, TOY_STEPS), run_gd(LR_GD, TOY_STEPS)
print(f"after {TOY_STEPS} steps: GD f = {gd_hist[-1]:.2e}, SPSA f = {spsa_hist[-1]:.2e}")

# %%
steps = list(range(1, TOY_STEPS + 1))
fig = go.Figure()
fig.add_trace(go.Scatter(x=steps, y=gd_hist, name=f"gradient descent, lr={LR_GD:.3g}"))
fig.add_trace(go.Scatter(x=steps, y=spsa_hist, name=f"SPSA, lr={LR_ZO:.3g}"))
fig.update_layout(title=f"f over iterations (d = {DIM})", xaxis_title="iteration",
                  yaxis_title="f(x)", yaxis_type="log", template="plotly_white")
fig.show()

# %% [markdown]
# GD wins per iteration, but a SPSA iteration costs two function evaluations and nothing else.
# What does SPSA follow *on average*? Gradient descent with SPSA's (small) learning rate:

# %%
fig.add_trace(go.Scatter(x=steps, y=run_gd(LR_ZO, TOY_STEPS), name=f"gradient descent, lr={LR_ZO:.3g}",
                         line={"dash": "dot"}))
fig.show()

# %% [markdown]
# ## 4. The estimate is unbiased
#
# With `E[z zᵀ] = I`, `E[g z] = E[z zᵀ] ∇f = ∇f`. One sample `g z = (zᵀ∇f) z` is never an
# ascent direction, but it points only roughly the right way (cosine ≈ `√(2/(π d))` on average
# for Gaussian `z`); the average of many converges to the gradient.

# %%
Z = torch.randn(N_ESTIMATES, DIM, generator=gen, dtype=torch.float64)  # (N, d)
G = (f(x0 + EPS * Z) - f(x0 - EPS * Z)) / (2 * EPS)  # (N,) one scalar per direction
estimates = G[:, None] * Z  # (N, d) one gradient estimate per row
running_mean = estimates.cumsum(0) / torch.arange(1, N_ESTIMATES + 1)[:, None]  # (N, d)
true_grad = grad_f(x0)

# %%
cos = torch.nn.functional.cosine_similarity(running_mean, true_grad[None], dim=1)  # (N,)
single = torch.nn.functional.cosine_similarity(estimates, true_grad[None], dim=1)
print(f"one sample:  cosine {single.min():.3f} at worst, {single.mean():.3f} on average "
      f"(sqrt(2 / (pi d)) = {(2 / (torch.pi * DIM)) ** 0.5:.3f})")
n = 1
while n <= N_ESTIMATES:
    print(f"mean of {n:>6} samples: cosine {cos[n - 1]:.4f}")
    n *= 10
print(f"mean of {N_ESTIMATES:>6} samples: cosine {cos[-1]:.4f}")

# %%
fig = go.Figure(go.Scatter(x=list(range(1, N_ESTIMATES + 1)), y=cos.tolist()))
fig.update_layout(title="cosine(mean of n SPSA estimates, true gradient)", xaxis_type="log",
                  xaxis_title="n", yaxis_title="cosine similarity", template="plotly_white")
fig.show()

# %% [markdown]
# ## 5. MeZO: SPSA for a language model
#
# MeZO (arXiv 2305.17333, Algorithm 1) is exactly this step applied to all parameters θ of a
# model with the training loss as `f`: perturb θ in place by `+eps z`, forward, `−2 eps z`,
# forward, `+eps z` back, then `θ -= lr · g · z`. Its memory trick: `z` is regenerated from a
# seed each time instead of being stored (tutorial 02). A run is described by a `TrainConfig`.

# %%
from distzo2_lab.config import TrainConfig

cfg = TrainConfig(model="tiny", steps=MEZO_STEPS, engine="eager", threads=THREADS)
print(f"model={cfg.model} steps={cfg.steps} engine={cfg.engine} batch={cfg.batch_size}x{cfg.seq_len} "
      f"lr={cfg.zo.lr} eps={cfg.zo.eps} noise={cfg.zo.noise}")

# %% [markdown]
# The `tiny` preset is a 2-layer OPT with random (seeded) weights. The `synthetic` task feeds it
# counting sequences (each token is the previous one plus one, modulo 16): easy to learn.

# %%
from distzo2_lab.run.train import base_of, build_adapter, make_task

adapter = build_adapter(base_of(cfg))
print(f"{sum(b.numel for b in adapter.buckets):,} parameters in buckets",
      [b.key for b in adapter.buckets])
task = make_task(cfg, adapter)
batch = task.batch(0)
print("input_ids", tuple(batch["input_ids"].shape), "first row:", batch["input_ids"][0, :12].tolist())

# %% [markdown]
# ### One MeZO step by hand
#
# `EagerMeZO` is the package's reference implementation of Algorithm 1. A step takes a batch
# and a seed (the seed *is* `z`) and returns both losses and the projected gradient `g`.

# %%
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.reference import EagerMeZO

engine = EagerMeZO(adapter, cfg.zo, cfg.precision, threads=THREADS)
eval_batch = task.batch(10**9)  # a batch the run never trains on
print(f"eval loss before: {engine.evaluate(eval_batch):.4f}")
r = engine.step(batch, step_seed(cfg.seed, 0))
print(f"l+ = {r.loss_plus:.6f}, l- = {r.loss_minus:.6f}, g = (l+ - l-) / (2 eps) = {r.grad:.4f}")
print(f"eval loss after one step: {engine.evaluate(eval_batch):.4f}")

# %% [markdown]
# ### A whole run
#
# A single step may well raise the loss (`z` is a random direction); many steps lower it.
# `train(cfg)` builds the same model and task from scratch and loops over the steps; every
# step's `(l+, l−, g)` lands in `summary["steps"]`.

# %%
from distzo2_lab.run.train import train

summary = train(cfg, progress=True)
print(f"eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f} "
      f"in {summary['seconds']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s)")

# %%
from distzo2_lab.observe.viz import loss_figure

loss_figure(summary["steps"], f"MeZO on the tiny OPT, {MEZO_STEPS} steps").show()

# %% [markdown]
# The losses `l±` fall although no gradient was ever computed, and `g` is a noisy scalar that
# shrinks as the model improves. Next, tutorial 02 looks at the seeds behind `z` and at ZO2's
# deferred update, which makes the same step cheaper to run on models too big for the device.
