"""Hardware profiles as data: what one node offers the planner and the stream simulator.

A profile is a frozen dataclass of rates and links: dense matmul rate per dtype and the share of
it a transformer forward reaches, device memory bandwidth (perturb / update passes), noise
samples per second, the per-device host links, the switch and host links that several devices
share, the peer link (NVLink) used by the sliced all-gather, and the runtime overhead per device.
Published datasheet figures for A100-80GB SXM, H100 SXM and the PCIe-only RTX 4090; "this
machine" is measured by ``distzo2 plan calibrate`` (see calibrate.py) and read from its JSON file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

from distzo2_lab.config import ConfigError

THIS_MACHINE = "this-machine"
DEFAULT_DIR = os.path.join("runs", "plan")


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    kind: str
    """'gpu' (one rank per device) or 'cpu' (ranks are processes sharing `cores`)."""
    device_memory_gb: float
    """Memory of one working device (GB = 1e9 bytes); for 'cpu' the node's RAM."""
    host_memory_gb: float
    """Host memory of one node."""
    devices_per_node: int
    matmul_tflops: dict = field(default_factory=dict)
    """Peak dense matmul TFLOP/s per compute dtype (for 'cpu': per thread)."""
    matmul_efficiency: float = 0.6
    """Share of the peak a transformer forward reaches once the GEMMs are large."""
    memory_gbps: float = 1000.0
    """Device memory bandwidth: perturb / update / cast passes are memory-bound."""
    rng_gsamples: float = 100.0
    """Noise samples generated per second (G) (for 'cpu': per thread)."""
    noise_gsamples: float | None = None
    """Counter-based Gaussian samples per second (G) that this engine's fused pass computes
    (zo/noise.py); None: `rng_gsamples`, which a calibration measures with that noise already.
    ZO2's modelled implementation draws with torch's generator at `rng_gsamples`."""
    launch_us: float = 50.0
    """Fixed cost of one block pass (kernel launches, Python), microseconds."""
    h2d_gbps: float = 25.0
    """Per-device host-to-device link (upload lane), GB/s."""
    d2h_gbps: float = 25.0
    """Per-device device-to-host link (offload lane), GB/s."""
    link_latency_us: float = 10.0
    devices_per_switch: int = 1
    """Devices behind one upstream switch link (PCIe switch); 1 = no switch sharing."""
    switch_gbps: float | None = None
    """Upstream link of one switch, per direction (shared by its devices); None = not limiting."""
    host_gbps: float | None = None
    """Host memory / root complex bandwidth of the node per direction, shared by every device."""
    peer_gbps: float | None = None
    """Peer link per device per direction (NVLink); None = peers talk through the host."""
    peer_latency_us: float = 10.0
    disk_read_gbps: float = 3.0
    disk_write_gbps: float = 2.0
    context_gb: float = 0.0
    """Runtime memory per device that no tensor accounts for (CUDA context, kernels, allocator
    slack; for 'cpu' the process with torch imported). See _CUDA_OVERHEAD_GB."""
    rate_by_width: dict = field(default_factory=dict)
    """'cpu' only: measured block-forward TFLOP/s per thread at some hidden widths {width: rate};
    small matrices run far below the large-GEMM rate. Interpolated in log(width)."""
    call_us: float = 5.0
    """Fixed cost of one noise fill or one elementwise pass over a bucket (kernel launch / Python)."""
    embed_us: float = 100.0
    """Fixed cost of the embeddings and the attention mask of one pass."""
    head_us: float | None = None
    """Fixed cost of one head pass (final norm, lm_head, log-softmax and loss): a few operations
    where a block pass runs a dozen, so it costs a fraction of `launch_us`. None: `launch_us`."""
    visit_us: float = 20.0
    """What one streamed visit adds to a step, on top of `block_us`: the streamer's hand-off
    (request, waiting on the lanes' threads, binding the buffer to the block, release) and the
    compute lane slowed while the lanes' threads run (calibrate.engine_overheads)."""
    visit_us_by_world: dict = field(default_factory=dict)
    """'cpu' only: `visit_us` at W ranks {W: us}, fitted by the calibration (`calibrate.fit_visit`)
    so that the simulated step of a real host-tier run of the tiny preset at W ranks (`visit_fit_us`)
    comes out as measured, the contention at W fitted first. Empty at a world size: `visit_us`."""
    visit_fit_us: dict = field(default_factory=dict)
    """'cpu' only: the real step {W: us} that `visit_us_by_world` at W was fitted to (rank 0's median
    step of `calibrate.fit_case(W, "host")`)."""
    step_us: float = 0.0
    """Fixed cost of one step that no span records: the training loop's own work (the batch, the
    seed and record of the step, the seed log) and the engine's between its phases."""
    block_us: float = 0.0
    """Fixed cost of one block visit that no span records (the Python between a visit's phases)."""
    disk_step_us: float = 0.0
    """Disk tier, beyond the host tier's: per step, outside any span (the commit's snapshot of the
    resident buckets, waiting for the previous commit)."""
    disk_visit_us: float = 0.0
    """Disk tier, beyond the host tier's: per visit (the lanes' file reads and writes)."""
    barrier_us: dict = field(default_factory=dict)
    """Measured fixed cost of a barrier among W processes {W: us} (back to back, mean of many rounds:
    the messages and waking W processes; the simulator adds the ranks' skew). Empty: `peer_latency_us`
    x (W - 1)."""
    collective_us: dict = field(default_factory=dict)
    """Measured fixed cost of the loss exchange (a scalar all-gather) among W processes {W: us} at
    the end of a step: after every rank has computed, less that compute (calibrate.gloo_probe).
    Empty: `peer_latency_us` x (W - 1)."""
    peer_gbps_by_world: dict = field(default_factory=dict)
    """'cpu' only: all-gather bandwidth measured among W processes {W: GB/s} (bytes each rank receives
    per second); replaces `peer_gbps` at that world size. Empty: `peer_gbps`."""
    gather_curve: dict = field(default_factory=dict)
    """'cpu' only: measured seconds of an all-gather among W processes by the bytes gathered in all
    {W: [[bytes, seconds], ...]}; the simulator interpolates it (linear between the sizes, the last
    two beyond them) instead of one bandwidth. Empty at a world size: `peer_gbps_by_world`."""
    share_us: dict = field(default_factory=dict)
    """'cpu' only: measured fixed cost of one shared noise piece among W ranks {W: us}, beyond drawing
    it: the claims under the node's lock, waiting for the member drawing a chunk, polling
    (noise_share.py). Empty: `call_us`."""
    contention: dict = field(default_factory=dict)
    """'cpu' only: slow-down of one single-threaded rank's compute when W ranks step together {W:
    factor >= 1} (oversubscription of the cores, and the passes after each loss exchange: a rank
    that waited there lost its core to other work). Empty: the cores are shared out in proportion
    (`compute_share`). Fitted by the calibration (`calibrate.fit_contention`) so that the simulated
    step of a real run of the tiny preset at W ranks (`contention_fit_us`, width 64: its weights stay
    in a core's own cache) comes out as measured."""
    contention_fit_us: dict = field(default_factory=dict)
    """'cpu' only: the real step {W: us} that `contention` at W was fitted to (rank 0's median step
    of `calibrate.fit_case(W)`: tiny, resident, batch 16 x 16 per dp group, PertP pairs)."""
    contention_wide: dict = field(default_factory=dict)
    """'cpu' only: the same slow-down measured with a block pass at width WIDE_WIDTH (OPT-125m's, batch
    2 x 64) {W: factor >= 1}: its weights do not fit a core's own cache and stream through the shared
    L3 and memory bus, so wide blocks contend more than narrow ones. Measured in short windows of
    every rank computing at once over rank 0 alone.
    The simulator interpolates between the two widths in log width. Empty: `contention` at every
    width."""
    cores: int | None = None
    """'cpu' only: cores shared by every rank's compute (ranks beyond them take turns)."""
    thread_scaling: float = 1.0
    """'cpu' only: speed-up of `cores` threads over one thread, per core (1.0 = linear)."""
    source: str = ""
    """Where the figures come from (datasheet, or the calibration run)."""

    RATES = ("memory_gbps", "rng_gsamples", "h2d_gbps", "d2h_gbps", "disk_read_gbps", "disk_write_gbps")
    LINKS = ("switch_gbps", "host_gbps", "peer_gbps")

    def __post_init__(self):
        # a rate of 0 would leave the simulator's transfers and passes unfinished forever
        for name in self.RATES + self.LINKS:
            v = getattr(self, name)
            if v is None and name in self.LINKS:
                continue
            if not isinstance(v, (int, float)) or not v > 0:
                none = " (or None: not limiting)" if name in self.LINKS else ""
                raise ConfigError(f"hardware {self.name!r}: {name}={v!r} is not valid; it must be a positive "
                                  f"number{none}")
        if self.noise_gsamples is not None and not (isinstance(self.noise_gsamples, (int, float))
                                                    and self.noise_gsamples > 0):
            raise ConfigError(f"hardware {self.name!r}: noise_gsamples={self.noise_gsamples!r} is not valid; it must "
                              "be a positive number (or None: rng_gsamples)")
        if not self.matmul_tflops and not self.rate_by_width:
            raise ConfigError(f"hardware {self.name!r}: matmul_tflops is empty; give a rate per compute dtype")

    def tflops(self, dtype: str) -> float:
        if dtype in self.matmul_tflops:
            return self.matmul_tflops[dtype]
        return self.matmul_tflops.get("fp32", min(self.matmul_tflops.values()))

    def visit_at(self, world: int) -> float:
        """Microseconds one streamed visit adds at `world` ranks: the fitted figure there (or between
        the fitted world sizes: `per_world`), else the one-process `visit_us`."""
        fitted = self.per_world("visit_us_by_world", world) if world > 1 else None
        return self.visit_us if fitted is None else fitted

    def per_world(self, name: str, world: int) -> float | None:
        """A measured {W: value} figure at `world` ranks: the value measured there, else linear in W
        between (or beyond, from the last two of) the measured worlds; None when nothing was measured."""
        pts = sorted((int(k), float(v)) for k, v in getattr(self, name).items())
        if not pts:
            return None
        for k, v in pts:
            if k == world:
                return v
        if len(pts) == 1:
            return pts[0][1]
        lo = [p for p in pts if p[0] < world]
        hi = [p for p in pts if p[0] > world]
        (w0, v0), (w1, v1) = (lo[-1], hi[0]) if lo and hi else (pts[:2] if not lo else pts[-2:])
        return max(0.0, v0 + (v1 - v0) * (world - w0) / (w1 - w0))

    def gather_s(self, world: int, nbytes: float) -> float | None:
        """Seconds of an all-gather of `nbytes` in all among `world` ranks from `gather_curve` (None
        when it was not measured at that world size)."""
        measured = self.gather_curve.get(world) or self.gather_curve.get(str(world)) or []  # str: read from JSON
        pts = sorted((float(b), float(t)) for b, t in measured)
        if not pts:
            return None
        pts = [(0.0, self.sync_s("gather", world))] + pts
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if nbytes <= b1:
                return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = pts[-2:]
        return t1 + (t1 - t0) * (nbytes - b1) / (b1 - b0)

    def sync_s(self, kind: str, world: int) -> float:
        """Seconds of the fixed cost of one collective ('barrier' or 'gather') among `world` ranks."""
        if world <= 1:
            return 0.0
        got = self.per_world("barrier_us" if kind == "barrier" else "collective_us", world)
        return (got if got is not None else (world - 1) * self.peer_latency_us) * 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


NARROW_WIDTH, WIDE_WIDTH = 64, 768
"""Hidden widths the CPU calibration measures at: the tiny preset's (`contention`, the small block's
rate) and OPT-125m's (`contention_wide`, the wide block's rate)."""


# DGX-style nodes: 2 GPUs per PCIe Gen4/Gen5 switch, one x16 uplink per switch, NVSwitch between GPUs.
# The effective PCIe figures are what pinned cudaMemcpyAsync reaches (about 80% of the signalling rate).
# _CUDA_OVERHEAD_GB is the stated per-GPU runtime overhead, one constant for every GPU and model size.
_CUDA_OVERHEAD_GB = 2.25
# The counter-based Gaussian (zo/noise.py) is about 160 instructions a Box-Muller draw, half integer
# (three lowbias32 hashes, the bit search of ln), half fp32 (the ln and cos / sin polynomials, an
# IEEE division and square root), and a draw gives the two samples of a pair: about 80 a sample. Its
# rate is the SMs' issue rate over 80, fp32 and int32 lanes taken in turn.
_NOISE_MODEL = "about 80 instructions a sample (160 a pair) at the SMs' fp32 / int32 issue rates, until calibrated"

PROFILES: dict[str, Hardware] = {
    "a100-80g-sxm": Hardware(
        name="a100-80g-sxm", description="NVIDIA A100 80GB SXM4, 8 per node (DGX A100): PCIe Gen4 x16, "
        "2 GPUs per PCIe switch, NVLink 3 through NVSwitch", kind="gpu", device_memory_gb=80.0,
        host_memory_gb=2000.0, devices_per_node=8, matmul_tflops={"fp16": 312.0, "bf16": 312.0, "fp32": 156.0},
        matmul_efficiency=0.6, memory_gbps=2039.0, rng_gsamples=250.0,
        noise_gsamples=120.0, launch_us=150.0, h2d_gbps=24.0,
        d2h_gbps=24.0, link_latency_us=10.0, devices_per_switch=2, switch_gbps=24.0, host_gbps=100.0,
        peer_gbps=240.0, peer_latency_us=15.0, disk_read_gbps=6.0, disk_write_gbps=3.0,
        context_gb=_CUDA_OVERHEAD_GB, source="NVIDIA A100 datasheet (312 TFLOP/s fp16 dense, 2039 GB/s HBM2e, "
        "NVLink 600 GB/s bidirectional); DGX A100 topology; PCIe at ~75% of 32 GB/s; fp32 = TF32; "
        "counter-based noise: " + _NOISE_MODEL + " (108 SMs x 64 fp32 / 64 int32 lanes x 1.41 GHz)"),
    "h100-sxm": Hardware(
        name="h100-sxm", description="NVIDIA H100 80GB SXM5, 8 per node (DGX H100): PCIe Gen5 x16, "
        "2 GPUs per PCIe switch, NVLink 4 through NVSwitch", kind="gpu", device_memory_gb=80.0,
        host_memory_gb=2000.0, devices_per_node=8, matmul_tflops={"fp16": 989.0, "bf16": 989.0, "fp32": 495.0},
        matmul_efficiency=0.5, memory_gbps=3350.0, rng_gsamples=400.0,
        noise_gsamples=250.0, launch_us=120.0, h2d_gbps=48.0,
        d2h_gbps=48.0, link_latency_us=8.0, devices_per_switch=2, switch_gbps=48.0, host_gbps=200.0,
        peer_gbps=360.0, peer_latency_us=12.0, disk_read_gbps=10.0, disk_write_gbps=5.0,
        context_gb=_CUDA_OVERHEAD_GB, source="NVIDIA H100 datasheet (989 TFLOP/s fp16 dense, 3.35 TB/s HBM3, "
        "NVLink 900 GB/s bidirectional); PCIe Gen5 at ~75% of 64 GB/s; fp32 = TF32; "
        "counter-based noise: " + _NOISE_MODEL + " (132 SMs x 128 fp32 / 64 int32 lanes x 1.83 GHz)"),
    "rtx4090": Hardware(
        name="rtx4090", description="NVIDIA GeForce RTX 4090 24GB, PCIe Gen4 x16 each, no NVLink and no "
        "peer-to-peer: the all-gather goes through host memory", kind="gpu", device_memory_gb=24.0,
        host_memory_gb=256.0, devices_per_node=4, matmul_tflops={"fp16": 165.0, "bf16": 165.0, "fp32": 82.6},
        matmul_efficiency=0.6, memory_gbps=1008.0, rng_gsamples=150.0,
        noise_gsamples=340.0, launch_us=100.0, h2d_gbps=24.0,
        d2h_gbps=24.0, link_latency_us=10.0, devices_per_switch=1, switch_gbps=None, host_gbps=60.0,
        peer_gbps=None, peer_latency_us=25.0, disk_read_gbps=5.0, disk_write_gbps=3.0,
        context_gb=_CUDA_OVERHEAD_GB, source="NVIDIA Ada whitepaper (165 TFLOP/s fp16 dense with fp32 "
        "accumulate, 1008 GB/s GDDR6X); PCIe Gen4 at ~75% of 32 GB/s; dual-channel DDR5 host; "
        "counter-based noise: " + _NOISE_MODEL + " (128 SMs x 128 fp32 / 64 int32 lanes x 2.52 GHz)"),
}


def calibration_path(directory: str = DEFAULT_DIR) -> str:
    """The JSON file `distzo2 plan calibrate` writes and `this-machine` reads."""
    return os.path.join(directory, f"{THIS_MACHINE}.json")


def save_profile(hw: Hardware, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(hw.to_dict(), f, indent=1)
    os.replace(tmp, path)
    return path


def load_profile(path: str) -> Hardware:
    with open(path) as f:
        data = json.load(f)
    known = set(Hardware.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"hardware file {path!r} has unknown fields {sorted(unknown)}; re-run distzo2 plan calibrate")
    return Hardware(**data)


def names() -> tuple[str, ...]:
    return (*PROFILES, THIS_MACHINE)


def get_hardware(name: str, directory: str = DEFAULT_DIR) -> Hardware:
    """A profile by name; 'this-machine' reads the calibration file in `directory`."""
    if name in PROFILES:
        return PROFILES[name]
    if name == THIS_MACHINE:
        path = calibration_path(directory)
        if not os.path.exists(path):
            raise ConfigError(f"hardware='{THIS_MACHINE}' has not been measured yet: run `distzo2 plan calibrate "
                              f"--dir {directory}` first (it writes {path})")
        return load_profile(path)
    raise ConfigError(f"hardware={name!r} is not known; choose one of {', '.join(names())}")


def with_overrides(hw: Hardware, **changes) -> Hardware:
    """A copy of `hw` with some figures changed (what-if studies in notebooks)."""
    return replace(hw, **changes)
