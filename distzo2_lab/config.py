"""Run configuration: frozen dataclasses and the one place where they are validated.

Every field has a docstring-style comment, every field is consumed somewhere, and every invalid
value or combination raises one :class:`ConfigError` that names the field(s) and the valid
choices. Notebooks change values with :func:`dataclasses.replace`; presets are plain functions.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from distzo2_lab.errors import ConfigError  # noqa: F401 (re-exported: the validation error)

NOISE_KINDS = ("gaussian", "rademacher")
OPTIMIZERS = ("sgd", "momentum", "adam", "sign", "conservative", "hizoo")
PERTURBATIONS = ("dense", "gaussian", "rademacher", "lowrank:R", "sparse:F")
ESTIMATORS = ("two-point", "one-sided")
STATE_FLOATS = {"sgd": 0, "momentum": 1, "adam": 2, "sign": 0, "conservative": 0, "hizoo": 1}
"""fp32 floats of optimiser state per parameter (zo/methods.py declares the names; a test keeps them equal)."""
PERTURB_MODES = ("auto", "in-place", "copy")
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
STORAGE_DTYPES = ("fp32", "bf16", "fp16")
MASTER_DTYPES = ("fp32", "bf16", "none")
ENGINES = ("zo2", "eager")
SUITE_TASKS = ("sst2", "rte", "cb", "boolq", "wic", "copa", "squad")  # MeZO's suite, read from a directory
TASKS = ("synthetic", "text", *SUITE_TASKS)
DEVICES = ("cpu", "cuda")
OFFLOAD_TIERS = ("resident", "host", "disk")
SHARE_GRAIN_ENV = "DISTZO2_SHARE_GRAIN"


def share_grain() -> int:
    """Elements a rank claims at once when the ranks of a node share noise draws or copies
    (parallel.node_share): 1 << 20, large enough that a claim's lock costs little beside the work.
    The environment variable DISTZO2_SHARE_GRAIN sets it (lessons and tests use small grains so
    that the tiny model's blocks are split too); a piece of one grain is computed by each rank alone."""
    import os

    raw = os.environ.get(SHARE_GRAIN_ENV, str(1 << 20))
    try:
        grain = int(raw)
    except ValueError:
        grain = 0
    if grain <= 0:
        raise ConfigError(f"{SHARE_GRAIN_ENV}={raw!r} is not valid; it must be a positive integer (elements)")
    return grain
PEFT_KINDS = ("lora", "prefix")


@dataclass(frozen=True)
class ZOConfig:
    """Hyper-parameters of the ZO-SGD (MeZO) step."""

    lr: float = 3e-3
    """Learning rate of theta <- theta - lr * (g * z + wd * theta). The default suits the tiny
    synthetic demo; MeZO fine-tunes OPT-13B with 1e-6 or 1e-7."""
    eps: float = 1e-3
    """Perturbation scale: the two passes see theta + eps z and theta - eps z."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to biases and LayerNorm weights (MeZO)."""
    noise: str = "gaussian"
    """Distribution of z: 'gaussian' (N(0, 1)) or 'rademacher' (+1/-1 with equal odds)."""
    directions: int = 1
    """q independent perturbation directions per step, updates averaged (n-SPSA, MeZO's variant).
    q > 1 perturbs out of place (theta + eps z_j into a copy), and a layout with pert = 2q runs
    one (direction, sign) per rank."""
    perturb: str = "auto"
    """How the passes see theta +- eps z: 'copy' makes the copies theta + eps z and theta - eps z
    in the compute dtype in one fused pass per visit, which also applies the pending update (the
    master is read once, z never stored, no rounding drift, and a PertP rank makes only its own
    sign's copy); 'in-place' is MeZO's literal round trip on the fp32 weights (+eps, -2 eps, +eps
    restore: no copies, a rounding drift of about one ulp per step); 'auto' is copy, except on a
    lean disk tier (offload.lean), which keeps no copy of the embeddings and runs in place."""
    freeze: tuple[str, ...] = ()
    """Glob patterns of parameter names held fixed (e.g. '*word_embeddings*'): their z is 0, so
    they are never perturbed nor updated, and the gradient estimate spans only the rest. Each
    pattern must match at least one parameter of the model."""
    optimizer: str = "sgd"
    """The update rule (zo/methods.py): 'sgd' (MeZO), 'momentum' (ZO-SGD-MMT), 'adam' (ZO-Adam),
    'sign' (ZO-SGD-Sign), 'conservative' (ZO-SGD-Cons) of ZO-Bench (arXiv 2402.11592), or 'hizoo'
    (diagonal-Hessian preconditioning, arXiv 2402.15173). Other than 'sgd' (and with perturbation or
    estimator other than the defaults), engine='zo2' runs it on every tier (not lean) and under PertP,
    DDP and 2D layouts, sliced or not."""
    perturbation: str = "dense"
    """What z looks like: 'dense' (every element drawn from zo.noise; 'gaussian' / 'rademacher' say
    the same and must equal zo.noise), 'lowrank:R' (LOZO,
    arXiv 2410.07698: z of a weight matrix is U V^T / sqrt(R)), 'sparse:F' (Sparse-MeZO, arXiv
    2402.15751: only the fraction F of smallest-|theta| entries of each tensor is perturbed)."""
    estimator: str = "two-point"
    """'two-point' (MeZO's (l+ - l-) / 2 eps per direction) or 'one-sided' (FZOO, arXiv 2506.09034:
    one unperturbed forward and zo.directions >= 2 one-sided directions, step divided by their
    losses' standard deviation)."""
    momentum: float = 0.9
    """optimizer='momentum': m <- beta m + g z (ZO-Bench's ZO-SGD-MMT)."""
    adam_beta1: float = 0.9
    """optimizer='adam': first-moment decay (Adam's default)."""
    adam_beta2: float = 0.999
    """optimizer='adam': second-moment decay (Adam's default)."""
    adam_eps: float = 1e-8
    """optimizer='adam': added to sqrt(v_hat) (Adam's default)."""
    hessian_smooth: float = 1e-8
    """optimizer='hizoo': alpha of H <- (1 - alpha) H + alpha |l+ + l- - 2 l0| / (2 eps^2) H z^2
    (HiZOO's smoothing; small, as in its experiments)."""
    lowrank_interval: int = 50
    """perturbation='lowrank:R': V is redrawn every this many steps (LOZO's lazy subspace), U every step."""
    sparse_refresh: int = 0
    """perturbation='sparse:F': recompute the per-tensor |theta| thresholds every this many steps;
    0 keeps the thresholds of step 0. The mask |theta| <= threshold is read from theta every step."""

    def __post_init__(self):
        if isinstance(self.freeze, list):  # from JSON (summary, seed log, checkpoint state)
            object.__setattr__(self, "freeze", tuple(self.freeze))


@dataclass(frozen=True)
class PrecisionConfig:
    """Where numbers are rounded: forward compute, stored parameters, and the master copy."""

    compute: str = "fp32"
    """Forward-pass arithmetic: 'fp32', or 'bf16' / 'fp16' through torch.autocast."""
    storage: str = "fp32"
    """dtype of the parameters the forward reads: 'fp32', 'bf16' or 'fp16'."""
    master: str = "fp32"
    """Copy that receives perturbations and updates when storage is lower precision:
    'fp32' keeps an fp32 master; 'bf16' (with storage 'bf16') holds the master in bf16 and writes
    every update back stochastically rounded with seeded noise, so an update far below bf16's
    resolution still lands on average and a replay rounds the same way (half the host memory and
    the host tier's bytes); 'none' is refused for bf16/fp16 storage (updates would be lost)."""


@dataclass(frozen=True)
class OffloadConfig:
    """Where the transformer blocks live between visits and how they stream (ZO2, Sec. 3)."""

    tier: str = "resident"
    """'resident' (no offloading), 'host' (CPU memory) or 'disk' (a store directory)."""
    prefetch: int = 1
    """Upload lane runs this many block visits ahead of compute (working memory: prefetch + 2 blocks,
    prefetch + 1 in a lean run)."""
    store: str | None = None
    """Disk tier: the store directory (created if missing, resumed from if it holds a run)."""
    link_gbps: float | None = None
    """Simulated link bandwidth in GB/s for every transfer (CPU demo of a slow link); None = real speed."""
    lean: bool = False
    """Disk tier: keep the embedding bucket in the store between its uses too (peak memory of
    about one embedding matrix or prefetch + 1 blocks; costs two more noise passes over it and
    over every block, whose noise is regenerated slab by slab for each pass)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run on one rank."""

    model: str = "tiny"
    """A preset name (see ``distzo2_lab.models.PRESETS``) or a local checkpoint directory."""
    steps: int = 300
    """Number of ZO steps."""
    seed: int = 0
    """Run seed: model init, data order and every step seed derive from it."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 32
    """Tokens per sequence; must not exceed the model's position table."""
    micro_batches: int = 1
    """Gradient accumulation: each rank's rows run as this many micro-batches inside every block
    visit (activation memory of one micro-batch per forward); their losses are token-weighted, so
    the step sees the loss of the whole batch. It must divide the rows of each dp group."""
    engine: str = "zo2"
    """'zo2' (block engine: dual forward, deferred fused update) or 'eager' (MeZO reference)."""
    task: str = "synthetic"
    """'synthetic' (embedded learnable sequences), 'text' (causal LM on ``data``), or a task of
    MeZO's suite in its protocol and prompt, from the directory ``data``: 'sst2', 'rte' (GLUE
    TSV), 'cb', 'boolq', 'wic', 'copa' (SuperGLUE JSONL) or 'squad' (SQuAD v1.1 JSON)."""
    data: str | None = None
    """Text or TSV file for task='text' (TSV: first column, header skipped); for a suite task the
    directory of its published files (sst2 / rte: train.tsv, dev.tsv; cb / boolq / wic / copa:
    train.jsonl, val.jsonl; squad: train-v1.1.json, dev-v1.1.json)."""
    shots: int | None = None
    """A suite task: k examples per class for train and for validation (k-shot, MeZO uses 16 and
    512; squad: k examples); None samples 1000 train / 500 validation examples."""
    threads: int = 2
    """torch intra-op threads and noise-generation threads."""
    device: str = "cpu"
    """Working device: 'cpu' or 'cuda' (parameters, noise and compute all live there)."""
    zo: ZOConfig = field(default_factory=ZOConfig)
    """ZO-SGD hyper-parameters."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Compute / storage / master dtypes."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    """Parameter offloading and streaming."""
    peft: str | None = None
    """'lora:R': wrap the model with ``peft`` LoRA adapters of rank R; 'prefix:N': with ``peft``
    prefix tuning, N virtual key/value positions per attention layer (OPT, GPT-2, LLaMA, Qwen2
    models; not BERT). Either is seeded
    from ``seed`` and trains alone: every other parameter is held fixed (zo.freeze). None trains
    every parameter."""


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}")


def _positive(name: str, value: float, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ConfigError(f"{name}={value!r} is not valid; it must be {kind}")


def validate_zo(zo: ZOConfig) -> ZOConfig:
    _positive("zo.lr", zo.lr)
    _positive("zo.eps", zo.eps)
    if not isinstance(zo.weight_decay, (int, float)) or zo.weight_decay < 0:
        raise ConfigError(f"zo.weight_decay={zo.weight_decay!r} is not valid; it must be >= 0")
    _choice("zo.noise", zo.noise, NOISE_KINDS)
    _positive("zo.directions", zo.directions, integer=True)
    _choice("zo.perturb", zo.perturb, PERTURB_MODES)
    if not isinstance(zo.freeze, tuple) or not all(isinstance(p, str) and p.strip() for p in zo.freeze):
        raise ConfigError(f"zo.freeze={zo.freeze!r} is not valid; it must be a tuple of non-empty glob patterns "
                          "of parameter names, e.g. ('*word_embeddings*',)")
    validate_method(zo)
    if zo.perturb == "in-place" and zo.directions > 1:
        raise ConfigError(f"zo.perturb='in-place' with zo.directions={zo.directions}: n-SPSA perturbs out of place; "
                          "choose zo.perturb='copy' or 'auto', or zo.directions=1")
    return zo


def parse_perturbation(spec: str) -> tuple[str, float]:
    """'dense' -> ('dense', 0); 'gaussian' -> ('gaussian', 0); 'lowrank:4' -> ('lowrank', 4);
    'sparse:0.25' -> ('sparse', 0.25)."""
    kind, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    try:
        if kind in ("dense", *NOISE_KINDS) and not arg:
            return kind, 0
        if kind == "lowrank" and arg.isdigit() and int(arg) > 0:
            return kind, int(arg)
        if kind == "sparse" and 0 < float(arg) <= 1:
            return kind, float(arg)
    except ValueError:
        pass
    raise ConfigError(f"zo.perturbation={spec!r} is not valid; choose one of {', '.join(PERTURBATIONS)} "
                      "(R a positive integer, 0 < F <= 1; e.g. 'lowrank:4', 'sparse:0.25')")


def is_family(zo: ZOConfig) -> bool:
    """True when the step is not plain MeZO: another optimiser, perturbation or estimator."""
    kind = parse_perturbation(zo.perturbation)[0]
    return (zo.optimizer, zo.estimator) != ("sgd", "two-point") or kind not in ("dense", zo.noise)


def validate_method(zo: ZOConfig) -> None:
    """The method family's fields and the combinations that make no sense together."""
    _choice("zo.optimizer", zo.optimizer, OPTIMIZERS)
    kind, _ = parse_perturbation(zo.perturbation)
    _choice("zo.estimator", zo.estimator, ESTIMATORS)
    for name in ("momentum", "adam_beta1", "adam_beta2"):
        v = getattr(zo, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            raise ConfigError(f"zo.{name}={v!r} is not valid; it must be in [0, 1)")
    _positive("zo.adam_eps", zo.adam_eps)
    _positive("zo.hessian_smooth", zo.hessian_smooth)
    if zo.hessian_smooth >= 1:
        raise ConfigError(f"zo.hessian_smooth={zo.hessian_smooth!r} is not valid; it must be in (0, 1)")
    _positive("zo.lowrank_interval", zo.lowrank_interval, integer=True)
    if not isinstance(zo.sparse_refresh, int) or isinstance(zo.sparse_refresh, bool) or zo.sparse_refresh < 0:
        raise ConfigError(f"zo.sparse_refresh={zo.sparse_refresh!r} is not valid; it must be an integer >= 0")
    if kind in NOISE_KINDS and kind != zo.noise:
        raise ConfigError(f"zo.perturbation={zo.perturbation!r} with zo.noise={zo.noise!r}: a dense perturbation "
                          f"is the noise itself; set both to {kind!r}")
    if zo.optimizer == "hizoo" and (zo.estimator != "two-point" or zo.directions > 1 or kind == "lowrank"):
        raise ConfigError("zo.optimizer='hizoo' estimates the Hessian from l+ + l- - 2 l0 of one direction, "
                          "and its preconditioned z is not low-rank: it needs zo.estimator='two-point', "
                          "zo.directions=1 and zo.perturbation gaussian, rademacher or sparse:F")
    if zo.estimator == "one-sided" and zo.directions < 2:
        raise ConfigError(f"zo.estimator='one-sided' with zo.directions={zo.directions}: FZOO divides the step by the "
                          "standard deviation of the directions' losses; choose zo.directions >= 2")
    if is_family(zo) and zo.perturb == "in-place":
        raise ConfigError(f"zo.perturb='in-place' with zo.optimizer={zo.optimizer!r}, zo.perturbation="
                          f"{zo.perturbation!r}, zo.estimator={zo.estimator!r}: the method family perturbs out of "
                          "place (the master stays theta_t until its update); choose zo.perturb='copy' or 'auto'")


def forwards_per_step(zo: ZOConfig) -> int:
    """Forward passes of one step: 2 per two-point direction, or K + 1 one-sided; plus the unperturbed
    forward of hizoo / conservative (shared with one-sided's) and conservative's trial forward."""
    q = zo.directions
    n = 2 * q if zo.estimator == "two-point" else q + 1
    if zo.optimizer in ("hizoo", "conservative") and zo.estimator == "two-point":
        n += 1
    return n + (zo.optimizer == "conservative")


def copies_perturbation(zo: ZOConfig) -> bool:
    """True when the passes read out-of-place copies theta +- eps z (zo.perturb, see ZOConfig)."""
    return zo.perturb != "in-place"


def resolve_perturb(cfg: TrainConfig) -> TrainConfig:
    """cfg with zo.perturb='auto' made concrete (what a run records in its seed log and summary)."""
    if cfg.zo.perturb != "auto":
        return cfg
    mode = "in-place" if cfg.offload.lean and cfg.zo.directions == 1 else "copy"
    return dataclasses.replace(cfg, zo=dataclasses.replace(cfg.zo, perturb=mode))


def validate_precision(p: PrecisionConfig) -> PrecisionConfig:
    _choice("precision.compute", p.compute, COMPUTE_DTYPES)
    _choice("precision.storage", p.storage, STORAGE_DTYPES)
    _choice("precision.master", p.master, MASTER_DTYPES)
    if p.storage != "fp32" and p.master == "none":
        raise ConfigError(
            f"precision.storage={p.storage!r} with precision.master='none' would silently lose "
            f"updates: a MeZO update (lr * g * z, about 1e-7 at lr 1e-7) is far below {p.storage}'s "
            f"resolution. Choose precision.master='fp32' or precision.storage='fp32'"
        )
    if p.master == "bf16" and p.storage != "bf16":
        raise ConfigError(f"precision.master='bf16' is the bf16 weights the forward reads, rounded stochastically; "
                          f"precision.storage={p.storage!r} differs. Choose precision.storage='bf16' (and compute "
                          f"'bf16') or precision.master='fp32'")
    if p.storage != "fp32" and p.compute != p.storage:
        raise ConfigError(
            f"precision.storage={p.storage!r} needs precision.compute={p.storage!r} (the forward reads "
            f"{p.storage} weights; compute={p.compute!r} cannot); choose compute={p.storage!r} or storage='fp32'"
        )
    return p


def validate_offload(o: OffloadConfig) -> OffloadConfig:
    _choice("offload.tier", o.tier, OFFLOAD_TIERS)
    if not isinstance(o.prefetch, int) or isinstance(o.prefetch, bool) or o.prefetch < 0:
        raise ConfigError(f"offload.prefetch={o.prefetch!r} is not valid; it must be an integer >= 0")
    if o.tier == "disk" and not o.store:
        raise ConfigError("offload.tier='disk' needs offload.store=DIR (the store directory)")
    if o.tier != "disk" and o.store:
        raise ConfigError(f"offload.store={o.store!r} is only used by offload.tier='disk'")
    if not isinstance(o.lean, bool):
        raise ConfigError(f"offload.lean={o.lean!r} is not valid; it must be True or False")
    if o.lean and o.tier != "disk":
        raise ConfigError(f"offload.lean=True parks the embeddings in the disk store; offload.tier={o.tier!r} "
                          "has none. Choose offload.tier='disk' or lean=False")
    if o.link_gbps is not None:
        _positive("offload.link_gbps", o.link_gbps)
        if o.tier == "resident":
            raise ConfigError("offload.link_gbps simulates the transfers of offload.tier='host' or 'disk'; "
                              "offload.tier='resident' moves nothing")
    return o


def parse_peft(spec: str) -> tuple[str, int]:
    """'lora:8' -> ('lora', 8), 'prefix:16' -> ('prefix', 16); one ConfigError naming the field and
    the valid forms otherwise."""
    kind, _, n = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind not in PEFT_KINDS or not n.isdigit() or int(n) <= 0:
        raise ConfigError(f"peft={spec!r} is not valid; choose 'lora:R' (LoRA adapters of rank R) or 'prefix:N' "
                          "(a prefix of N virtual tokens), R and N positive integers (e.g. 'lora:8', 'prefix:16')")
    return kind, int(n)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field and combination of a run config; return it unchanged or raise."""
    if not isinstance(cfg.model, str) or not cfg.model:
        raise ConfigError(f"model={cfg.model!r} is not valid; give a preset name or a directory")
    _positive("steps", cfg.steps, integer=True)
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r} is not valid; it must be an integer >= 0")
    _positive("batch_size", cfg.batch_size, integer=True)
    _positive("seq_len", cfg.seq_len, integer=True)
    _positive("micro_batches", cfg.micro_batches, integer=True)
    if cfg.batch_size % cfg.micro_batches:
        fits = ", ".join(str(m) for m in range(1, cfg.batch_size + 1) if cfg.batch_size % m == 0)
        raise ConfigError(f"micro_batches={cfg.micro_batches} does not divide batch_size={cfg.batch_size}; "
                          f"choose one of {fits}")
    if cfg.seq_len < 2:
        raise ConfigError(f"seq_len={cfg.seq_len} is not valid; a causal LM loss needs seq_len >= 2")
    _choice("engine", cfg.engine, ENGINES)
    _choice("task", cfg.task, TASKS)
    if cfg.task == "text" and not cfg.data:
        raise ConfigError("task='text' needs data=PATH (a .txt or .tsv file)")
    if cfg.task == "synthetic" and cfg.data:
        raise ConfigError(f"data={cfg.data!r} is only read by task='text' or a suite task "
                          f"({', '.join(SUITE_TASKS)}); choose one of them or drop data")
    if cfg.task in SUITE_TASKS and not cfg.data:
        raise ConfigError(f"task={cfg.task!r} needs data=DIR (a directory holding its published train and dev files)")
    if cfg.shots is not None:
        _positive("shots", cfg.shots, integer=True)
        if cfg.task not in SUITE_TASKS:
            raise ConfigError(f"shots={cfg.shots} is only read by task='sst2' and the other suite tasks "
                              f"({', '.join(SUITE_TASKS[1:])}); choose one of them or shots=None")
    _positive("threads", cfg.threads, integer=True)
    _choice("device", cfg.device, DEVICES)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device here; choose device='cpu'")
    validate_zo(cfg.zo)
    validate_precision(cfg.precision)
    validate_offload(cfg.offload)
    if is_family(cfg.zo) and cfg.offload.lean:
        raise ConfigError(f"offload.lean=True runs MeZO's in-place step; the method family (zo.optimizer="
                          f"{cfg.zo.optimizer!r}, zo.perturbation={cfg.zo.perturbation!r}, zo.estimator="
                          f"{cfg.zo.estimator!r}) perturbs out of place. Choose offload.lean=False or the defaults "
                          f"sgd, {cfg.zo.noise}, two-point")
    if cfg.offload.lean and cfg.zo.directions > 1:
        raise ConfigError(f"offload.lean=True runs MeZO's in-place step; zo.directions={cfg.zo.directions} (n-SPSA) "
                          "perturbs out of place. Choose offload.lean=False or zo.directions=1")
    if cfg.offload.lean and cfg.zo.perturb == "copy":
        raise ConfigError("offload.lean=True runs MeZO's in-place step; zo.perturb='copy' perturbs out of place. "
                          "Choose offload.lean=False or zo.perturb='in-place'")
    if cfg.precision.master == "bf16":
        _check_bf16_master(cfg)
    if cfg.peft is not None:
        parse_peft(cfg.peft)
    if cfg.offload.tier != "resident" and cfg.engine == "eager":
        raise ConfigError("engine='eager' is the resident reference; offload.tier='host' or 'disk' needs engine='zo2'")
    return cfg


def _check_bf16_master(cfg: TrainConfig) -> None:
    """precision.master='bf16' rounds once per update, in the fused visit of the copies (see ZOConfig)."""
    if cfg.zo.perturb == "in-place" or cfg.offload.lean:
        raise ConfigError("precision.master='bf16' with zo.perturb='in-place' (or offload.lean=True) would round the "
                          "master at every +eps / -2 eps / +eps perturbation; choose zo.perturb='copy' or 'auto' "
                          "without offload.lean, or precision.master='fp32'")
    if cfg.offload.tier == "disk":
        raise ConfigError("precision.master='bf16' is held in memory (offload.tier 'resident' or 'host'); the disk "
                          "store's crash-safe slots hold fp32. Choose offload.tier='resident' or 'host', or "
                          "precision.master='fp32'")
    if is_family(cfg.zo):
        raise ConfigError(f"precision.master='bf16' rounds MeZO's ZO-SGD update; zo.optimizer={cfg.zo.optimizer!r}, "
                          f"zo.perturbation={cfg.zo.perturbation!r}, zo.estimator={cfg.zo.estimator!r} keep fp32 "
                          f"masters. Choose precision.master='fp32' or the defaults (sgd, dense, two-point)")


def replace(cfg, **changes):
    """``dataclasses.replace`` followed by validation (for TrainConfig)."""
    new = dataclasses.replace(cfg, **changes)
    return validate(new) if isinstance(new, TrainConfig) else new
