"""Memory planner: peak memory per working device, host memory per node and disk for a layout.

Every figure is a sum of named components, each derived from the model's exact shapes (a preset
built on the meta device) and the run's settings, never fitted per model size:
resident modules, blocks in flight (prefetch + 2 working buffers, ZO2 Sec. 3.3), noise buffers,
all-gather buffers (DistZO2 Sec. 3.3 slicing), activations of the perturbed passes (the hidden
states kept alive plus the largest transient of a block or of the head), and a stated runtime
overhead per device. Two implementations are modelled: ZO2's public code (fp16 store, z drawn per
tensor, eager attention) for checking against its published peaks, and this toolkit's engine.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from distzo2_lab.config import (
    ESTIMATORS,
    OFFLOAD_TIERS,
    OPTIMIZERS,
    PERTURB_MODES,
    STATE_FLOATS,
    ConfigError,
    PrecisionConfig,
    validate_precision,
)
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import Hardware

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# -- model shapes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """Exact parameter counts of a preset and the sizes the activations depend on."""

    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    block_params: int
    """Parameters of one transformer block (every block has the same shapes)."""
    resident_in: int
    """Embeddings, positions, project_in (lm_head is tied to the embeddings)."""
    resident_out: int
    """Final LayerNorm, project_out."""
    largest_tensor: int
    """Largest single parameter tensor of a block (fc1 / fc2 weight)."""
    block_matmul_params: int
    """Weights of the block's linear layers (what its forward multiplies by)."""
    head_matmul_params: int
    """vocab x embedding width: the logits matmul."""

    @property
    def resident(self) -> int:
        return self.resident_in + self.resident_out

    @property
    def total(self) -> int:
        return self.resident + self.layers * self.block_params


@functools.lru_cache(maxsize=None)
def model_shape(name: str) -> ModelShape:
    """Counts from the preset built on the meta device. Blocks are homogeneous, so a one-block
    copy of the config gives every count exactly (total = resident + layers x block)."""
    from transformers import OPTForCausalLM

    from distzo2_lab.models.opt import opt_groups, unique_params
    from distzo2_lab.models.presets import opt_config

    cfg = opt_config(name)
    layers = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    import torch

    with torch.device("meta"):
        m = OPTForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.decoder.embed_tokens.weight
    seen: set[int] = set()
    groups = {k: unique_params(mods, seen) for k, mods in opt_groups(m)}
    block = groups["block.0"]
    return ModelShape(
        name=name, hidden=cfg.hidden_size, layers=layers, heads=cfg.num_attention_heads, ffn=cfg.ffn_dim,
        vocab=cfg.vocab_size,
        block_params=sum(p.numel() for _, p in block),
        resident_in=sum(p.numel() for _, p in groups["in"]),
        resident_out=sum(p.numel() for _, p in groups["out"]),
        largest_tensor=max(p.numel() for _, p in block),
        block_matmul_params=sum(p.numel() for n, p in block if p.dim() == 2),
        head_matmul_params=m.lm_head.weight.numel())


# -- what is being planned ----------------------------------------------------------------------
@dataclass(frozen=True)
class Implementation:
    """The parts of an implementation that change memory and traffic."""

    name: str
    store_fp32: bool
    """The store holds fp32 masters and blocks travel as fp32 (this toolkit), or the storage dtype (ZO2)."""
    noise: str
    """'block': one fp32 z buffer as wide as a block (this engine); 'tensor': z of one parameter
    tensor at a time in the compute dtype (ZO2's code)."""
    resident_extras: bool
    """Resident buckets keep their +eps state (for the head) and an fp32 z buffer (this engine)."""
    attention: str
    """'eager' (heads x T x T scores, fp32 softmax) or 'sdpa' (fused: no T x T tensor)."""


ZO2_REFERENCE = Implementation("zo2", store_fp32=False, noise="tensor", resident_extras=False, attention="eager")
THIS_ENGINE = Implementation("distzo2_lab", store_fp32=True, noise="block", resident_extras=True, attention="sdpa")
IMPLEMENTATIONS = {i.name: i for i in (ZO2_REFERENCE, THIS_ENGINE)}


@dataclass(frozen=True)
class Workload:
    model: str = "opt-1.3b"
    batch: int = 1
    """Sequences per dp group per step (each pert pair shares them)."""
    seq: int = 2048
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig("fp16", "fp16", "fp32"))
    tier: str = "host"
    """Where the blocks live between visits: 'resident', 'host' or 'disk'."""
    prefetch: int = 1
    """Upload lane runs this many visits ahead (prefetch + 2 working buffers)."""
    implementation: Implementation = THIS_ENGINE
    directions: int | None = None
    """n-SPSA directions per step (zo.directions); None: one per PertP pair (pert / 2), or 1."""
    perturb: str = "auto"
    """zo.perturb: 'copy' (the fused pass writes compute-dtype copies theta +- eps z of the visited
    block), or 'in-place' (MeZO's round trip on the fp32 weights); 'auto' is copy."""
    optimizer: str = "sgd"
    """zo.optimizer: its fp32 state (config.STATE_FLOATS per parameter) lives beside each master."""
    estimator: str = "two-point"
    """zo.estimator: 'one-sided' runs K + 1 forwards a step (K = directions)."""


def state_bytes(w: Workload) -> int:
    """Bytes of optimiser state per parameter (fp32 floats beside the master)."""
    return 4 * STATE_FLOATS[w.optimizer]


def extra_forwards(w: Workload, q: int = 1) -> int:
    """Forwards a step runs besides one per (direction, sign): the unperturbed one of one-sided (its
    K + 1), hizoo and conservative, and conservative's trial forward (config.forwards_per_step)."""
    unperturbed = w.estimator == "one-sided" or w.optimizer in ("hizoo", "conservative")
    return int(unperturbed) + int(w.optimizer == "conservative")


def check_workload(w: Workload) -> Workload:
    validate_precision(w.precision)
    if w.tier not in OFFLOAD_TIERS:
        raise ConfigError(f"tier={w.tier!r} is not valid; choose one of {', '.join(OFFLOAD_TIERS)}")
    for name in ("batch", "seq"):
        v = getattr(w, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r} is not valid; it must be a positive integer")
    if w.directions is not None and (not isinstance(w.directions, int) or w.directions < 1):
        raise ConfigError(f"directions={w.directions!r} is not valid; it must be a positive integer (or None)")
    if not isinstance(w.prefetch, int) or w.prefetch < 0:
        raise ConfigError(f"prefetch={w.prefetch!r} is not valid; it must be an integer >= 0")
    if w.perturb not in PERTURB_MODES:
        raise ConfigError(f"perturb={w.perturb!r} is not valid; choose one of {', '.join(PERTURB_MODES)}")
    for name, value, choices in (("optimizer", w.optimizer, OPTIMIZERS), ("estimator", w.estimator, ESTIMATORS)):
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}")
    if w.precision.master == "bf16" and w.tier == "disk":
        raise ConfigError("precision.master='bf16' is held in memory; tier='disk' keeps fp32 slots. Choose tier "
                          "'resident' or 'host', or master 'fp32'")
    model_shape(w.model)  # raises ConfigError for an unknown preset
    return w


@dataclass
class MemoryPlan:
    """Bytes per component for one working device, the node's host memory and the disk."""

    device: dict[str, float]
    host: dict[str, float]
    disk: dict[str, float]
    device_capacity: float
    host_capacity: float

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def disk_total(self) -> float:
        return sum(self.disk.values())

    @property
    def fits(self) -> bool:
        return self.device_total <= self.device_capacity and self.host_total <= self.host_capacity

    def problems(self) -> list[str]:
        out = []
        if self.device_total > self.device_capacity:
            out.append(f"needs {self.device_total / GB:.1f} GB per device, "
                       f"the device has {self.device_capacity / GB:.0f}")
        if self.host_total > self.host_capacity:
            out.append(f"needs {self.host_total / GB:.0f} GB of host memory, "
                       f"the node has {self.host_capacity / GB:.0f}")
        return out


def master_bytes(w: Workload) -> int:
    """Bytes per parameter of a master: fp32, or bf16 under precision.master='bf16' (this engine)."""
    if not w.implementation.store_fp32:
        return DTYPE_BYTES[w.precision.storage]
    return 2 if w.precision.master == "bf16" else 4


def transfer_bytes_per_element(w: Workload) -> int:
    """Bytes per parameter the upload / offload lanes move each way: the master's."""
    return master_bytes(w)


def padded_block(shape: ModelShape, world: int, sliced: bool) -> int:
    """Elements of a working buffer: the block, padded to one equal shard per rank when sliced."""
    if not sliced:
        return shape.block_params
    return -(-shape.block_params // world) * world


def activation_bytes(shape: ModelShape, w: Workload, passes_alive: int) -> dict[str, float]:
    """Hidden states kept alive across the blocks, and the largest transient of one visit."""
    c = DTYPE_BYTES[w.precision.compute]
    b, t, h = w.batch, w.seq, shape.hidden
    bth = b * t * h * c
    if w.implementation.attention == "eager":  # scores (c) + fp32 softmax, plus the (B, 1, T, T) mask
        attention = shape.heads * b * t * t * (c + 4) + b * t * t * c + 3 * bth
    else:  # fused attention: q, k, v and the output
        attention = 4 * bth
    ffn = b * t * shape.ffn * c * 2 + bth  # fc1 output, activation, fc2 output
    head = b * t * shape.vocab * (c + 4 + 4)  # logits, the fp32 copy, log-softmax
    return {"hidden states": passes_alive * bth, "transient": max(attention, ffn, head) + bth}


def copies_of(w: Workload, layout: Layout) -> bool:
    """True when the passes read out-of-place copies theta +- eps z (zo.perturb copy, or n-SPSA)."""
    q = directions_of(w, layout)
    if w.perturb == "in-place" and q > 1:
        raise ConfigError(f"perturb='in-place' with {q} directions: n-SPSA perturbs out of place; choose perturb="
                          "'copy' or 'auto'")
    return w.perturb != "in-place"


def directions_of(w: Workload, layout: Layout) -> int:
    """q, the n-SPSA directions per step: the workload's, else one per PertP pair (pert / 2), else 1."""
    q = w.directions if w.directions is not None else max(1, layout.pert // 2)
    if layout.pert > 2 and q % (layout.pert // 2):
        raise ConfigError(f"directions={q} does not fit pert={layout.pert}: pert = 2m splits the directions over m "
                          f"pairs, so m must divide directions; choose directions as a multiple of {layout.pert // 2}")
    return q


def memory_plan(w: Workload, layout: Layout, hw: Hardware) -> MemoryPlan:
    """Peak bytes per component on one working device, host memory per node, disk."""
    check_workload(w)
    shape, impl = model_shape(w.model), w.implementation
    s, c = DTYPE_BYTES[w.precision.storage], DTYPE_BYTES[w.precision.compute]
    mb = master_bytes(w)
    low = s != mb  # a lower-precision working copy next to the master (none when a bf16 master is read)
    world, sliced = layout.world_size, layout.slice and w.tier != "resident" and layout.world_size > 1
    moved = transfer_bytes_per_element(w)
    dev: dict[str, float] = {"runtime overhead": hw.context_gb * GB}
    copies = copies_of(w, layout) and impl.store_fp32
    if impl.resident_extras and copies:  # master, working copy, both compute-dtype copies
        dev["resident modules"] = shape.resident * (mb + (s if low else 0) + 2 * c)
    elif impl.resident_extras:  # master, working copy, the +eps state, one fp32 z per bucket
        dev["resident modules"] = shape.resident * (mb + (s if low else 0) + s + 4)
    else:
        dev["resident modules"] = shape.resident * s
    width = padded_block(shape, world, sliced)
    if w.tier == "resident":
        per_block = (mb + (s if low else 0)) if impl.store_fp32 else s
        dev["blocks"] = shape.layers * shape.block_params * per_block
    else:
        buffers = min(w.prefetch, shape.layers - 1) + 2
        dev["blocks in flight"] = buffers * width * moved + (shape.block_params * s if impl.store_fp32 and low else 0)
    if not copies:  # the fused pass of the copies computes z where it is used: no noise buffer
        dev["noise"] = width * 4 if impl.noise == "block" else shape.largest_tensor * c
    if sliced:
        dev["all-gather buffers"] = width // world * moved  # this rank's shard, copied as the send buffer
    q = directions_of(w, layout)
    if copies:  # the visited block's compute-dtype copies: both signs, or a PertP rank's own
        dev["perturbed copies"] = shape.block_params * c * (2 if layout.pert == 1 else 1)
    # hidden states alive together: one per (direction, sign) this rank runs (h+ and h- with pert=1)
    passes = (2 if layout.pert == 1 else 1) * (q if layout.pert == 1 else q // (layout.pert // 2))
    for k, v in activation_bytes(shape, w, passes).items():
        dev[f"activations: {k}"] = v
    ranks_per_node = min(world, hw.devices_per_node)
    host: dict[str, float] = {}
    disk: dict[str, float] = {}
    blocks_total = shape.layers * shape.block_params
    f = state_bytes(w)
    if f:  # optimiser state beside each master: resident with the resident modules, streamed with a block
        dev["optimizer state: resident modules"] = shape.resident * f
        if w.tier == "resident":
            dev["optimizer state: blocks"] = blocks_total * f
        else:
            dev["optimizer state: blocks in flight"] = (min(w.prefetch, shape.layers - 1) + 2) * width * f
        if w.tier == "host":
            host["optimizer state: blocks"] = blocks_total * f
        elif w.tier == "disk":
            host["optimizer state: staging buffers"] = ranks_per_node * width * f
            disk["optimizer state (two slots each)"] = 2 * (blocks_total + shape.resident) * f
    if w.tier == "host":
        host["blocks (one shared copy)"] = blocks_total * moved
    elif w.tier == "disk":
        host["staging buffers"] = ranks_per_node * width * moved
        disk["blocks (two slots each)"] = 2 * blocks_total * 4
        disk["resident modules (two slots each)"] = 2 * shape.resident * 4
    if hw.kind == "cpu":  # the working device is the host: one RAM holds everything
        host["working memory of the ranks"] = ranks_per_node * sum(dev.values())
        return MemoryPlan(dev, host, disk, hw.device_memory_gb * GB, hw.host_memory_gb * GB)
    return MemoryPlan(dev, host, disk, hw.device_memory_gb * GB, hw.host_memory_gb * GB)


def mezo_bytes(w: Workload, hw: Hardware) -> float:
    """Plain MeZO on one device: every parameter resident, z of one tensor at a time, one pass alive."""
    shape = model_shape(w.model)
    s, c = DTYPE_BYTES[w.precision.storage], DTYPE_BYTES[w.precision.compute]
    acts = activation_bytes(shape, w, 1)
    return hw.context_gb * GB + shape.total * s + shape.largest_tensor * c + sum(acts.values())


def adam_bytes(w: Workload, hw: Hardware) -> float:
    """Mixed-precision Adam fine-tuning on one device: fp16 weights and gradients, fp32 master and two
    fp32 moments (16 bytes per parameter), before any activation is stored for the backward pass."""
    return hw.context_gb * GB + model_shape(w.model).total * 16

