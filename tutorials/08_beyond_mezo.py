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
# # 08 · Beyond MeZO: the ZO method family
#
# MeZO's step has three parts: a **direction** `z` (dense Gaussian noise), an **estimator** that
# turns losses into a scalar `g = (l+ − l−) / (2 eps)`, and an **update rule** `θ -= lr g z`.
# Later papers change one part each. The toolkit keeps them as three independent settings,
# `zo.optimizer`, `zo.perturbation` and `zo.estimator`, run by the eager reference
# `EagerFamily` (`distzo2 train --engine eager --optimizer NAME`) and, bit for bit the same, by the
# block engine on the resident and host tiers (`--engine zo2`). This lesson says what each
# method changes, then runs them all on the same tiny task.

# %% [markdown]
# ## What you will see
#
# 1. What each method changes in the ZO step, and each update rule applied by hand to four numbers.
# 2. The same tiny OPT, the same batches and the same seeds, trained with each method.
# 3. Their held-out loss curves side by side.
# 4. What each costs: time per step, forwards per step and optimiser-state memory (held by the
#    engine, and as the memory planner budgets it).

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DISTZO2_TUTORIAL_SIZE", "full")  # "tiny" in CI, "full" by default
assert SIZE in ("tiny", "full"), f"DISTZO2_TUTORIAL_SIZE={SIZE!r}: choose 'tiny' or 'full'"
STEPS = 30 if SIZE == "tiny" else 200  # steps per method on the tiny OPT
EVAL_EVERY = 10  # steps between two held-out losses
THREADS = 1  # torch threads: the times per step compare at one thread count

# %%
import plotly.graph_objects as go
import plotly.io as pio
import torch

from distzo2_lab.config import ZOConfig
from distzo2_lab.zo.methods import METHODS, Scalars, apply_

pio.renderers.default = "plotly_mimetype+notebook"  # works offline in Jupyter Lab / Notebook
torch.set_num_threads(THREADS)

# %% [markdown]
# ## 1. What each method changes
#
# **ZO-SGD (MeZO, arXiv 2305.17333)** is the baseline: `θ -= lr g z`, no state, two forwards.
#
# **Update rules** (`zo.optimizer`). ZO-Bench (arXiv 2402.11592) benchmarks the classic
# first-order rules fed with the ZO estimate `g z` instead of a gradient:
#
# - **ZO-SGD-MMT** (`momentum`) keeps `m <- β m + g z` and steps `θ -= lr m`: successive noisy
#   estimates average out along the directions they agree on. One float of state per parameter.
# - **ZO-Adam** (`adam`) keeps Adam's two moments of `g z` and steps by `m̂ / (√v̂ + ε)`: a
#   per-parameter step size. Two floats per parameter, as much as the model itself twice over.
# - **ZO-SGD-Sign** (`sign`) steps `θ -= lr sign(g z)`: every parameter moves by exactly `lr`,
#   whatever the size of `g`, which tames rare huge estimates but keeps all of the noise in `z`.
# - **ZO-SGD-Cons** (`conservative`) computes the SGD candidate, evaluates it on the same batch and
#   keeps it only if the loss does not rise: two more forwards (the loss at `θ` and at the candidate).
#
# **HiZOO** (`hizoo`, arXiv 2402.15173) perturbs along `z / √H` with a diagonal Hessian estimate
# `H`, updated from the second difference `|l+ + l− − 2 l0| / (2 eps²)`: flat directions get large
# steps, curved ones small. One more forward (`l0`) and one float of state per parameter.
#
# **Directions** (`zo.perturbation`). **LOZO** (`lowrank:R`, arXiv 2410.07698) draws the `z` of
# each weight matrix as a rank-R product `U Vᵀ / √R`, `V` kept for `zo.lowrank_interval` steps:
# the estimate lives in a low-dimensional subspace, like the gradients of fine-tuning do.
# **Sparse-MeZO** (`sparse:F`, arXiv 2402.15751) perturbs only the fraction `F` of each tensor's
# smallest-magnitude weights, the rest held still: fewer directions, less noise per step.
#
# **Estimator** (`zo.estimator`). **FZOO** (`one-sided`, arXiv 2506.09034) runs one unperturbed
# forward `l0` and K one-sided forwards `l_j = L(θ + eps z_j)`, and divides each `(l_j − l0) / eps`
# by the standard deviation of the K losses: a normalised step, K + 1 forwards that a block
# engine can batch into one pass per block.

# %% [markdown]
# Each rule is elementwise: given `θ`, the direction `z`, the scalar `g` and its state, it updates
# `θ` in place (`zo/methods.py`). Two identical steps on four numbers show what the state does:
# momentum's second step is larger than SGD's (it adds the first one again), Adam and sign move
# each non-zero element by `lr` a step whatever `g`, HiZOO's second step is smaller where `H`
# grew (where `z²` was large), and a conservative step that is kept is SGD's.

# %%
theta0, z = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, -1.0, 2.0, 0.0])
for name, method in METHODS.items():
    theta, state = theta0.clone(), method.init_state(4, "cpu")
    for t in (1, 2):
        apply_(method, theta, z, state, Scalars(g=2.0, lr=0.1, t=t, curvature=1.0, smooth=0.5))
    steps = [round(v, 3) for v in (theta - theta0).tolist()]
    print(f"{name:>12}: theta - theta0 = {steps}  state: {', '.join(state) or 'none'}")

# %% [markdown]
# ## 2. The same task, each method
#
# `distzo2_lab.bench.methods.run_method` builds the tiny OPT exactly as `distzo2 train --engine
# eager` does, trains it on the synthetic counting task and records a held-out loss every
# `EVAL_EVERY` steps. Every run starts from the same weights and sees the same batches and step
# seeds; only the zo settings differ. Each method gets a learning rate that suits it: the rules
# scale the step differently (momentum sums about `1 / (1 − β)` estimates, sign and Adam step
# by about `lr` per element), so one shared rate would favour some of them.

# %%
from distzo2_lab.bench.methods import method_table, run_method

RUNS = {
    "ZO-SGD (MeZO)": ZOConfig(lr=3e-3),
    "ZO-SGD-MMT": ZOConfig(optimizer="momentum", lr=3e-4),
    "ZO-Adam": ZOConfig(optimizer="adam", lr=1e-2),
    "ZO-SGD-Sign": ZOConfig(optimizer="sign", lr=3e-3),
    "ZO-SGD-Cons": ZOConfig(optimizer="conservative", lr=3e-3),
    "HiZOO": ZOConfig(optimizer="hizoo", lr=3e-3),
    "LOZO (lowrank:2)": ZOConfig(perturbation="lowrank:2", lr=3e-3),
    "Sparse-MeZO (sparse:0.5)": ZOConfig(perturbation="sparse:0.5", lr=1e-2),
    "FZOO (one-sided, K=4)": ZOConfig(estimator="one-sided", directions=4, noise="rademacher",
                                      perturbation="rademacher", lr=1e-5),
}
runs = [run_method(zo, STEPS, label, eval_every=EVAL_EVERY) for label, zo in RUNS.items()]
print(f"{len(runs)} methods x {STEPS} steps, {runs[0].params:,} parameters each")

# %% [markdown]
# ## 3. Loss curves
#
# The held-out loss of each run (a batch the runs never train on), against the steps taken.

# %%
fig = go.Figure()
for r in runs:
    steps, losses = zip(*r.eval_losses)
    fig.add_trace(go.Scatter(x=steps, y=losses, name=r.label, mode="lines+markers"))
fig.update_layout(title=f"The ZO method family on the tiny OPT, {STEPS} steps",
                  xaxis_title="step", yaxis_title="held-out loss")
fig.show()

# %% [markdown]
# ## 4. What each method costs
#
# The time per step follows the forwards per step (conservative and HiZOO pay for `l0`, FZOO for
# its K + 1 forwards); LOZO's structured `z` costs extra work to build on this CPU. The state
# column is what the engine holds beside its fp32 masters, in brackets what the memory planner
# (`distzo2_lab.plan.memory.state_bytes`) budgets for the same parameters: momentum and HiZOO
# add as much memory as the fp32 model itself, Adam twice as much, the others nothing.

# %%
from IPython.display import Markdown

print("held state equals the planner's:", all(r.state_bytes == r.planned_state_bytes for r in runs))
Markdown(method_table(runs))

# %% [markdown]
# Which method wins here says little about fine-tuning a pretrained model: the tiny OPT starts from
# random weights (where, for instance, Sparse-MeZO's small weights carry little) and runs a few
# hundred steps. ZO-Bench and the papers above compare them on real tasks. What carries over is
# the cost side: forwards per step and state per parameter are the same at any size, and the
# planner of tutorial 07 turns them into bytes and seconds for OPT-175B
# (`Workload(optimizer=...)`). The block engine (`FamilyEngine`) runs every method too, with the
# state streamed in each block's host slot on the host tier, and gives the eager reference's bits.
