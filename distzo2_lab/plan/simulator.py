"""Stream simulator: a discrete-event run of every rank's upload / exchange / compute / offload lanes.

It builds the task graph of `steps` ZO steps the way the engine and streamer run them
(ZO2 arXiv 2503.12668 Sec. 3.3; DistZO2 arXiv 2507.03211 Sec. 3): per visit the compute lane
applies the pending update, draws z, perturbs and runs the dual (or PertP single) forward; the
upload lane runs `prefetch` visits ahead into a pool of prefetch + 2 buffers and never reads a
block whose write-back is in flight; the offload lane writes blocks back in order; with slicing
each rank moves one shard and the ranks all-gather on the exchange lane; each step ends with the
scalar loss exchange. Transfers share links max-min fairly (a host link behind several devices,
a PCIe switch, the disk; on a CPU node with several ranks, the cores: a copy is a core's work);
NVLink all-gathers cost (W - 1) / W of the block plus W - 1 latencies. The output is a list of
:class:`~distzo2_lab.observe.events.Span`, so every view and metric of real runs works on simulated ones.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass, field

from distzo2_lab.config import share_grain
from distzo2_lab.observe.events import LANES, Span, overlap_metrics
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import NARROW_WIDTH, WIDE_WIDTH, Hardware
from distzo2_lab.plan.memory import (
    DTYPE_BYTES,
    Workload,
    check_workload,
    copies_of,
    directions_of,
    extra_forwards,
    master_bytes,
    model_shape,
    padded_block,
    transfer_bytes_per_element,
)


# -- what one rank's compute costs ------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Seconds of compute-lane work for one rank."""

    block_pass: float
    """One forward pass of one block over this rank's micro-batch."""
    head_pass: float
    """Final norm, logits and loss for one pass."""
    embed_pass: float
    rng_per_element: float
    axpy_per_element: float
    """One perturb / update pass over one parameter (read z and the master, write the master)."""
    call: float = 0.0
    """Fixed cost of one noise fill or elementwise pass over a bucket."""
    visit: float = 0.0
    """Streamer hand-off per streamed visit."""
    step: float = 0.0
    """Fixed cost of a step outside any span (the training loop, the engine between phases)."""
    block: float = 0.0
    """Fixed cost of a block visit outside any span."""
    speed: float = 1.0
    """CPU: the share of one thread's speed this rank gets (below 1 when ranks contend for the cores)."""


def compute_share(hw: Hardware, world: int, threads: int) -> float:
    """CPU: how many threads' worth of speed one rank gets when all `world` ranks compute at once
    (ranks beyond the cores take turns). The simulator itself shares the cores out moment by
    moment among the ranks computing then (`cpu_cores`); this is the static figure."""
    if hw.kind != "cpu":
        return 1.0
    cores = hw.cores or 1
    eff = threads * min(1.0, cores / (world * threads))
    return eff * (hw.thread_scaling if eff > 1 else 1.0)


def costs(w: Workload, layout: Layout, hw: Hardware, threads: int = 1) -> Costs:
    shape = model_shape(w.model)
    c, s = DTYPE_BYTES[w.precision.compute], DTYPE_BYTES[w.precision.storage]
    tokens = w.batch * w.seq
    share = compute_share(hw, 1, threads)  # one rank alone; run_graph shares the cores among the ranks
    rate = matmul_rate(hw, w.precision.compute, shape.hidden) * share
    slow = min(1.0, share) if hw.kind == "cpu" else 1.0
    mem = hw.memory_gbps * 1e9 * slow
    launch, call = hw.launch_us * 1e-6 / slow, hw.call_us * 1e-6 / slow

    def matmul(flops: float, weight_bytes: float) -> float:  # roofline: FLOPs or reading the weights
        return max(flops / rate, weight_bytes / mem)

    attention = 4 * w.batch * w.seq * w.seq * shape.hidden
    # a CPU pass runs its Python and then its arithmetic; a GPU pass's kernels are issued while the
    # device runs the earlier ones, so it costs the longer of the two
    both = max if hw.kind == "gpu" else (lambda a, b: a + b)
    block = both(launch, matmul(2 * tokens * shape.block_matmul_params + attention, shape.block_params * s))
    head_fixed = (hw.launch_us if hw.head_us is None else hw.head_us) * 1e-6 / slow
    head = both(head_fixed, matmul(2 * tokens * shape.head_matmul_params, shape.head_matmul_params * s)) \
        + tokens * shape.vocab * (c + 8) / mem  # the fp32 copy and log-softmax of the logits
    master = master_bytes(w)
    axpy = (3 * master + (s if master != s else 0)) / mem
    counter = w.implementation.noise == "block" and hw.noise_gsamples is not None  # this engine's noise
    rng = 1.0 / ((hw.noise_gsamples if counter else hw.rng_gsamples) * 1e9 * share)
    embed = hw.embed_us * 1e-6 / slow + tokens * shape.hidden * c * 3 / mem
    disk = w.tier == "disk"
    # the one-rank commit's snapshot and wait (several ranks: the barrier and the leader's writes, modelled)
    commit = hw.disk_step_us if disk and layout.world_size == 1 else 0.0
    visit = hw.visit_at(layout.world_size) + disk * hw.disk_visit_us
    return Costs(block, head, embed, rng, axpy, call, visit * 1e-6 / slow,
                 (hw.step_us + commit) * 1e-6 / slow, hw.block_us * 1e-6 / slow, slow)


def matmul_rate(hw: Hardware, dtype: str, width: int) -> float:
    """FLOP/s of a block forward at this hidden width (per thread on 'cpu')."""
    pts = sorted((int(k), v) for k, v in hw.rate_by_width.items())
    if not pts:
        return hw.tflops(dtype) * 1e12 * hw.matmul_efficiency
    if width <= pts[0][0] or len(pts) == 1:
        return pts[0][1] * 1e12 if width <= pts[0][0] else pts[-1][1] * 1e12
    for (w0, r0), (w1, r1) in zip(pts, pts[1:]):
        if width <= w1:
            return (r0 + _log_fraction(width, w0, w1) * (r1 - r0)) * 1e12
    return pts[-1][1] * 1e12


def _log_fraction(width: float, w0: float, w1: float) -> float:
    """Where `width` lies between widths w0 and w1 in log width (0 at w0, 1 at w1)."""
    return (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))


def cpu_cores(hw: Hardware, threads: int, world: int, width: int = NARROW_WIDTH) -> float:
    """CPU: the cores the ranks' compute shares (processor sharing in `run_graph`), in units of one
    rank's own speed (`threads` threads). From the measured contention at this world size (W
    single-threaded ranks computing at once each ran `contention[W]` times slower than one alone,
    so the node gave them W / contention[W] cores; other world sizes interpolated), capped by the
    cores; at least one rank's worth (one rank alone runs at its calibrated speed). With
    `contention_wide` measured too, the factor at the model's hidden `width` is interpolated in log
    width between NARROW_WIDTH and WIDE_WIDTH (and held beyond them): wide blocks also share the L3 and
    the memory bus."""
    cores = float(hw.cores or 1)
    factor = hw.per_world("contention", world) if world > 1 else None
    wide = hw.per_world("contention_wide", world) if world > 1 else None
    if factor is not None and wide is not None:
        factor = factor + min(1.0, max(0.0, _log_fraction(width, NARROW_WIDTH, WIDE_WIDTH))) * (wide - factor)
    if factor is not None:
        cores = min(cores, world / max(1.0, factor))
    return max(1.0, cores / threads)


# -- the task graph -------------------------------------------------------------------------------
@dataclass
class Task:
    id: int
    rank: int
    lane: str
    phase: str
    step: int
    block: int
    segments: list = field(default_factory=list)  # fixed work: [(phase, seconds)] back to back
    nbytes: float = 0.0  # a transfer: bytes over `path`
    path: tuple = ()
    latency: float = 0.0
    deps: list = field(default_factory=list)
    group: int | None = None  # a collective: every task of the group starts together
    cpu: tuple = ()  # CPU: fixed work shared out as a flow of nanoseconds over (node cores, the rank's thread)
    start: float | None = None
    end: float | None = None
    remaining: float = 0.0
    flowing_at: float = 0.0

    @property
    def transfer(self) -> bool:
        return bool(self.path)

    @property
    def flow(self) -> tuple:
        return self.path + self.cpu


class Graph:
    def __init__(self):
        self.tasks: list[Task] = []
        self.lanes: dict[tuple[int, str], list[int]] = {}
        self.groups: dict[int, list[int]] = {}

    def add(self, rank, lane, phase, step, block, deps=(), segments=None, nbytes=0.0, path=(), latency=0.0,
            group=None) -> int:
        t = Task(len(self.tasks), rank, lane, phase, step, block, list(segments or []), nbytes, tuple(path),
                 latency, [d for d in deps if d is not None], group)
        self.tasks.append(t)
        self.lanes.setdefault((rank, lane), []).append(t.id)
        if group is not None:
            self.groups.setdefault(group, []).append(t.id)
        return t.id


def _links(hw: Hardware, rank: int) -> dict[str, tuple]:
    node, local = divmod(rank, hw.devices_per_node)
    sw = local // max(1, hw.devices_per_switch)
    host_up = ("host_mem", node) if hw.kind == "cpu" else ("host_h2d", node)
    host_down = ("host_mem", node) if hw.kind == "cpu" else ("host_d2h", node)
    up = [("h2d", rank), host_up]
    down = [("d2h", rank), host_down]
    if hw.switch_gbps is not None and hw.devices_per_switch > 1:
        up.append(("sw_h2d", node, sw))
        down.append(("sw_d2h", node, sw))
    return {"upload": tuple(up), "offload": tuple(down), "disk_read": ("disk_read", node),
            "disk_write": ("disk_write", node), "peer": ("peer", rank)}


def _capacity(hw: Hardware, link: tuple) -> float:
    kind = link[0]
    gbps = {"h2d": hw.h2d_gbps, "d2h": hw.d2h_gbps, "host_h2d": hw.host_gbps, "host_d2h": hw.host_gbps,
            "host_mem": hw.host_gbps, "sw_h2d": hw.switch_gbps, "sw_d2h": hw.switch_gbps, "peer": hw.peer_gbps,
            "disk_read": hw.disk_read_gbps, "disk_write": hw.disk_write_gbps}[kind]
    return float("inf") if gbps is None else gbps * 1e9


def noise_groups(layout: Layout, hw: Hardware, q: int, block_params: int) -> dict[int, tuple[int, ...]]:
    """CPU ranks that split every whole-bucket draw of z (noise_share.py): the ranks of a node that
    run the same directions; empty when the layout does not share noise, a rank draws alone, or a
    block fits one share chunk (train.py opens no share: a one-chunk piece has nothing to split)."""
    world = layout.world_size
    if hw.kind != "cpu" or world == 1 or not getattr(layout, "share_noise", False) or block_params <= share_grain():
        return {}
    keys = {r: (r // hw.devices_per_node, tuple(layout.directions(r, q))) for r in range(world)}
    out = {}
    for r, k in keys.items():
        members = tuple(m for m in range(world) if keys[m] == k)
        if len(members) > 1:
            out[r] = members
    return out


def copy_groups_of(layout: Layout, hw: Hardware, q: int, block_params: int) -> dict[int, tuple[int, ...]]:
    """CPU ranks that share the perturbed block copies (zo.perturb copy, copy_share.CopyShare): the
    ranks of a node sharing the noise that also run the same one sign (a rank running both signs
    makes both copies in its one fused pass, z computed once for the two: sharing saves nothing)."""
    noise = noise_groups(layout, hw, q, block_params)
    return {r: m for r in noise if sum(layout.signs(r)) == 1
            and len(m := tuple(x for x in noise[r] if layout.signs(x) == layout.signs(r))) > 1}


def master_groups_of(layout: Layout, hw: Hardware, q: int, block_params: int) -> dict[int, tuple[int, ...]]:
    """CPU ranks holding their node's one master (master_share.MasterShare: the resident tier with
    copies): a rank's noise group when it is every rank of its node (all run the same directions).
    Each visit of a bucket, the update and the copies of every sign the node runs, is then one
    fused pass whose chunks the node's ranks claim, so the node computes z twice per parameter."""
    noise = noise_groups(layout, hw, q, block_params)
    node = {r: sum(1 for x in range(layout.world_size) if x // hw.devices_per_node == r // hw.devices_per_node)
            for r in noise}
    return {r: m for r, m in noise.items() if len(m) == node[r]}


class _Program:
    """One rank's compute-lane program: fixed work is gathered into segments, and a collective (a
    barrier of the noise-sharing ranks, a commit barrier) cuts it into tasks around a group task."""

    def __init__(self, g: Graph, rank: int, step: int):
        self.g, self.rank, self.step = g, rank, step
        self.segs: list = []
        self.last: int | None = None
        self.deps: list = []

    def after(self, *deps) -> None:
        self.deps += [d for d in deps if d is not None]

    def work(self, phase, seconds: float) -> None:
        self.segs.append((phase, seconds))

    def close(self, phase: str, block: int) -> int:
        """End the current task (empty work still makes a task: the lane's order point)."""
        self.last = self.g.add(self.rank, "compute", phase, self.step, block, [self.last, *self.deps], self.segs)
        self.segs, self.deps = [], []
        return self.last

    def wait(self, phase: str, block: int, seconds: float) -> None:
        """A wait of fixed wall-clock length on this lane (not work the cores share out)."""
        if self.segs or self.deps:
            self.close(phase, block)
        self.last = self.g.add(self.rank, "compute", phase, self.step, block, [self.last], [(phase, 0.0)],
                               latency=seconds)

    def sync(self, phase: str, block: int, key, latency: float, lane: str = "compute", seg=None) -> int:
        if self.segs or self.deps:
            self.close(phase, block)
        self.last = self.g.add(self.rank, lane, phase, self.step, block, [self.last], [(seg, 0.0)], latency=latency,
                               group=key)
        return self.last


def build_graph(w: Workload, layout: Layout, hw: Hardware, steps: int, threads: int) -> Graph:
    """Every rank's tasks for `steps` steps, in each lane's program order, with their dependencies."""
    shape = model_shape(w.model)
    cost = costs(w, layout, hw, threads)
    world, n = layout.world_size, shape.layers
    q = directions_of(w, layout)
    copies = copies_of(w, layout)  # out-of-place passes (zo.perturb copy, n-SPSA)
    extra_all = extra_forwards(w, q)  # the method family's unperturbed / trial forwards (one-sided: K + 1 in all)

    def dealt(r: int) -> tuple[list[tuple[int, int]], int]:
        """The method family's passes on rank r as FamilyEngine.passes deals them round-robin over the
        pert group: [(direction, its perturbed forwards)] and the rank's unperturbed / trial forwards."""
        p, size = layout.coords(r)[1], layout.pert
        trial = int(w.optimizer == "conservative")
        scales = (1,) if w.estimator == "one-sided" else (1, -1)
        keys = ["l0"] * (extra_all - trial) + [(j, sc) for j in range(q) for sc in scales]
        runs: dict[int, int] = {}
        for key in keys[p::size]:
            if key != "l0":
                runs[key[0]] = runs.get(key[0], 0) + 1
        return sorted(runs.items()), int("l0" in keys[p::size]) + trial * int(len(keys) % size == p)
    streamed = w.tier != "resident"
    sliced = layout.slice and streamed and world > 1
    depth = min(w.prefetch, n - 1)
    moved = transfer_bytes_per_element(w)
    width = padded_block(shape, world, sliced)
    shard = width // world if sliced else shape.block_params

    def own(r: int) -> int:
        """Elements of rank r's shard inside the real block (the last shards may be short or empty:
        shards are rounded up); the whole block when not sliced."""
        return max(0, min(shard, shape.block_params - r * shard)) if sliced else shape.block_params

    gather_bytes = (world - 1) / world * width * moved
    measured_gather = hw.gather_s(world, width * moved) if sliced and hw.kind == "cpu" else None
    shared = noise_groups(layout, hw, q, shape.block_params)
    chunk = share_grain()
    slot = -(-shape.block_params // chunk) * chunk  # node_share's slot: the widest block, whole chunks
    per_node = min(world, hw.devices_per_node)
    g = Graph()
    marker, upload, offload = {}, {}, {}
    step_done: dict[int, int | None] = {r: None for r in range(world)}
    axpy, rng, call = cost.axpy_per_element, cost.rng_per_element, cost.call
    copy_per_element = 8 / (hw.memory_gbps * 1e9 * cost.speed)  # read + write one fp32

    def fused_cost(zs: int) -> float:
        """Seconds per element of one fused visit pass computing `zs` noise values per element: on a
        GPU one kernel, bound by the larger of its arithmetic and its memory traffic (z never goes to
        memory); on a CPU, whose profile is calibrated with the fill and the axpy apart, their sum."""
        return max(zs * rng, axpy) if hw.kind == "gpu" else zs * rng + axpy

    def shared_piece(prog: _Program, phase: str, block: int, elements: int, size: int, per_element: float) -> None:
        """A piece computed by `size` ranks claiming its chunks (noise_share.SharedPieces): ranks
        arriving together wait for the longest run, ceil(chunks / size) chunks (work on this rank's
        core), plus the measured fixed cost of a shared piece at that size (`share_us`: claims under
        the node's lock, waiting for the member drawing a chunk, polling). That cost was measured as
        wall-clock time with the W ranks running at once, so it is a wait, not work the cores share
        out again; `call` (work) when not calibrated."""
        chunks = -(-elements // chunk)
        if chunks == 1:  # nothing to split: every member computes it alone (noise_share.py)
            prog.work(phase, elements * per_element + call)
            return
        fixed = hw.per_world("share_us", size)
        longest = min(elements, -(-chunks // size) * chunk)
        prog.work(phase, longest * per_element + (call if fixed is None else 0.0))
        if fixed is not None:
            prog.wait(phase, block, fixed * 1e-6)

    def draw(prog: _Program, r: int, elements: int, phase: str, block: int) -> None:
        """z of a whole bucket: drawn alone, or shared with the ranks of `shared`: each piece's chunks
        go to whichever member claims them first. Members that arrive together split a piece by
        whole chunks, so each waits for the longest run, ceil(chunks / size) chunks (a one-chunk
        piece is drawn by every member alone); plus the measured fixed cost of a shared piece
        at the group's size (`share_us`: claims, locks, polling) and the copy out of the slot.
        No barrier ties the ranks together: a late member finds its z drawn."""
        members = shared.get(r)
        if not members:
            prog.work(phase, elements * rng + call)
            return
        for p0 in range(0, elements, slot):
            piece = min(slot, elements - p0)
            shared_piece(prog, phase, block, piece, len(members), rng)
            if piece > chunk:  # a shared piece is copied out of its slot
                prog.work(phase, piece * copy_per_element)

    # the node's one master (resident tier, ZO-SGD with fp32 masters), else the copies of one sign shared
    one_master = copies and not streamed and w.optimizer == "sgd" and w.estimator == "two-point" \
        and w.precision.master == "fp32"
    masters = master_groups_of(layout, hw, q, shape.block_params) if one_master else {}
    copy_groups = copy_groups_of(layout, hw, q, shape.block_params) if copies and not masters else {}

    def visit_bucket(prog: _Program, r: int, phase: str, block: int, elements: int, zs: int) -> None:
        """A fused pass over a bucket computing `zs` noise values per element: alone, or as a shared
        piece of the node's one master (its chunks claimed by the node's ranks)."""
        members = masters.get(r)
        if members:
            shared_piece(prog, phase, block, elements, len(members), fused_cost(zs))
        else:
            prog.work(phase, elements * fused_cost(zs) + call)

    def fused(prog: _Program, r: int, elements: int, block: int, pending: bool, signs: int) -> None:
        """The fused pass of a copies visit (Perturber.visit): the pending update's z and this
        direction's z computed per element (rng each), the master read and written and the copies
        written (one axpy's traffic). With a node's copy share the update runs alone and each sign's
        copy is a shared piece (copy_share.CopyShare: chunks claimed like the noise, ceil(chunks /
        size) on the longest run), its z computed per copy."""
        members = copy_groups.get(r)
        phase = "update" if pending else "perturb"
        if masters:
            visit_bucket(prog, r, phase, block, elements, 1 + pending)
        elif members:
            if pending:
                prog.work("update", elements * fused_cost(1) + call)
            for _ in range(signs):
                shared_piece(prog, "perturb", block, elements, len(members), fused_cost(1))
        else:
            prog.work(phase, elements * fused_cost(1 + pending) + call)

    def update(prog, r, elements, block, local=False) -> None:
        """The deferred update of a bucket: q draws of z and q axpy passes."""
        for _ in range(q):
            if local:  # a sliced shard: this rank draws its own chunks
                prog.work("update", elements * rng + call)
            else:
                draw(prog, r, elements, "update", block)
            prog.work("update", elements * axpy + call)

    res_buckets = (shape.resident_in, shape.resident_out)
    for t in range(steps):
        pending = t > 0
        for r in range(world):
            plus, minus = layout.signs(r)
            signs = 1 if w.estimator == "one-sided" else int(plus) + int(minus)  # one-sided: +eps only
            mine = layout.directions(r, q)
            runs, extra = [(j, signs) for j in mine], extra_all
            if extra_all:  # the family's l0 / trial: its passes are dealt out over the pert group
                runs, extra = dealt(r)
            links = _links(hw, r)
            lane_bytes = own(r) * moved  # what this rank uploads and writes back per visit
            prog = _Program(g, r, t)
            prog.after(step_done[r])
            prog.work(None, cost.step)  # the loop's own work: no span in real runs
            # resident begin: the deferred update, then +eps (in place) or the fused pass's copies
            if not copies:
                for elem in res_buckets:
                    if pending:
                        update(prog, r, elem, -1)
                    draw(prog, r, elem, "rng", -1)
                    prog.work("embed", 2 * (elem * axpy + call) + elem * copy_per_element)  # +eps, keep
                prog.work("embed", signs * cost.embed_pass)
            else:
                for k, _ in enumerate(mine):  # the first direction's pass applies the pending update
                    for elem in res_buckets:
                        visit_bucket(prog, r, "update" if pending and k == 0 else "perturb", -1, elem,
                                     1 + (pending and k == 0))
                    prog.work("embed", signs * cost.embed_pass)
            prev = prog.close("embed", -1)
            for i in range(n):
                v = t * n + i
                elem = shape.block_params
                prog.work(None, cost.block)
                if streamed:
                    marker[r, v] = g.add(r, "compute", "request", t, i, [prev], [(None, cost.visit)])
                    up_path = links["upload"] + ((links["disk_read"],) if w.tier == "disk" else ())
                    upload[r, v] = g.add(r, "upload", "upload", t, i, [
                        marker.get((r, v - depth)) if v - depth >= 0 else None,
                        offload.get((r, v - depth - 2)), offload.get((r, v - n))],
                        nbytes=lane_bytes, path=up_path, latency=hw.link_latency_us * 1e-6)
                    prog.last = marker[r, v]
                    prog.after(upload[r, v])
                if sliced:
                    if pending and own(r):  # an empty shard (padding only) has nothing to update
                        if copies:  # the fused pass on the shard, the update only
                            prog.work("update", own(r) * fused_cost(1) + call)
                        else:
                            update(prog, r, own(r), i, local=True)
                    prog.close("update", i)
                    if measured_gather is not None:  # CPU: the all-gather's measured time at this size
                        prog.after(g.add(r, "exchange", "allgather", t, i, [prog.last], [("allgather", 0.0)],
                                         latency=measured_gather, group=("gather", v)))
                    else:
                        prog.after(g.add(r, "exchange", "allgather", t, i, [prog.last], nbytes=gather_bytes,
                                         path=(links["peer"],) if hw.peer_gbps is not None else
                                         links["upload"] + links["offload"],
                                         latency=hw.sync_s("gather", world), group=("gather", v)))
                elif pending and not copies:
                    update(prog, r, elem, i)
                if not copies:
                    draw(prog, r, elem, "rng", i)
                    perturb = ("perturb", elem * axpy + call)
                    prog.work(*perturb)
                    if plus:
                        prog.work("forward", cost.block_pass)
                    prog.work(*perturb)
                    if minus:
                        prog.work("forward", cost.block_pass)
                    prog.work(*perturb)
                else:
                    if not runs and pending and not sliced:  # a rank with no perturbed pass: the update alone
                        prog.work("update", elem * fused_cost(1) + call)
                    for k, (_, ns) in enumerate(runs):  # a sliced visit's update already landed on the shard
                        fused(prog, r, elem, i, pending and k == 0 and not sliced, ns)
                        for _ in range(ns):
                            prog.work("forward", cost.block_pass)
                for _ in range(extra):
                    prog.work("forward", cost.block_pass)
                prev = prog.close("visit", i)
                if streamed:
                    down = links["offload"] + ((links["disk_write"],) if w.tier == "disk" else ())
                    offload[r, v] = g.add(r, "offload", "offload", t, i, [prev], nbytes=lane_bytes, path=down,
                                          latency=hw.link_latency_us * 1e-6)
            # the head: both passes on the kept +eps state (in place), or on the kept copies (made
            # again by a fused pass per direction when there are several)
            if not copies:
                prog.work("head", signs * cost.head_pass + sum(res_buckets) * axpy + 2 * call)
            else:
                for _, ns in runs:
                    if len(runs) > 1:
                        for elem in res_buckets:
                            visit_bucket(prog, r, "head", -1, elem, 1)
                    prog.work("head", ns * cost.head_pass)
            if extra:
                prog.work("head", extra * cost.head_pass)
            head = prog.close("head", -1)
            if w.tier == "disk" and world == 1:  # commit on the offload lane after the step's writes
                g.add(r, "offload", "commit", t, -1, [head, offload.get((r, t * n + n - 1))], nbytes=sum(res_buckets)
                      * 4, path=links["offload"] + (links["disk_write"],), latency=hw.link_latency_us * 1e-6)
            done = g.add(r, "exchange", "exchange", t, -1, [head], [("exchange", 0.0)],
                         latency=hw.sync_s("gather", world), group=("exchange", t) if world > 1 else None)
            if w.tier == "disk" and world > 1:
                # several ranks on one store: drain the lanes, a barrier, then the leader writes the
                # resident buckets and the manifest on its compute thread
                node_ranks = per_node
                prog.last = done
                prog.after(offload.get((r, t * n + n - 1)))
                done = prog.sync("commit", -1, ("commit", r // hw.devices_per_node, t),
                                 hw.sync_s("barrier", node_ranks), seg=None)
                if r % hw.devices_per_node == 0:
                    done = g.add(r, "compute", "commit", t, -1, [done], nbytes=sum(res_buckets) * 4,
                                 path=(links["disk_write"],), latency=hw.link_latency_us * 1e-6)
            step_done[r] = done
    return g


# -- the event loop -------------------------------------------------------------------------------
def _fair_rates(flows: list[Task], hw: Hardware, cores: float = 1.0,
                copy_gbps: float | None = None) -> dict[int, float]:
    """Max-min fair rates of the flows over their links (progressive filling): bytes/s of the
    transfers; nanoseconds of work per second of the CPU work (`cores` per node, one per rank).
    `copy_gbps` (a CPU node whose copies are work of its cores, see `run_graph`): the transfers
    flow in nanoseconds of one copy thread's work too (bytes / `copy_gbps`: GB/s is bytes per ns),
    every link's capacity likewise, so that a copy and a rank's compute split the node's cores in
    one unit."""
    rates: dict[int, float] = {}
    cap: dict[tuple, float] = {}
    for f in flows:
        for link in f.flow:
            if link[0] == "cpu":
                cap.setdefault(link, cores * 1e9)
            elif link[0] == "thread":
                cap.setdefault(link, 1e9)
            else:
                cap.setdefault(link, _capacity(hw, link) / (copy_gbps or 1.0))
    active = {f.id: f for f in flows}
    while active:
        users: dict[tuple, list[int]] = {}
        for fid, f in active.items():
            for link in f.flow:
                users.setdefault(link, []).append(fid)
        link, share = min(((lk, cap[lk] / len(u)) for lk, u in users.items()), key=lambda x: x[1])
        for fid in users[link]:
            rates[fid] = share
            for lk in active[fid].flow:
                cap[lk] -= share
            del active[fid]
    return rates


def run_graph(g: Graph, hw: Hardware, cores: float | None = None) -> None:
    """Start every task as soon as its lane, its dependencies and its group allow; fill start / end.

    `cores` (CPU profiles with several ranks): the compute lanes' fixed work is processor-shared,
    the ranks computing at one moment split `cores` (each at most its own speed), and so is every
    transfer: on a CPU node an upload or a write-back is a memory copy that a lane's thread runs
    on one of those cores (a copy alone moves `h2d_gbps` on one core). One rank leaves the other
    cores to its lanes; several ranks computing at once share them with their copies, which is why
    a host-tier step with several ranks on a CPU node costs more over the resident one than with one."""
    tasks = g.tasks
    copy_gbps = hw.h2d_gbps if cores is not None and hw.kind == "cpu" else None
    head = {lane: 0 for lane in g.lanes}
    now, left = 0.0, len(tasks)
    fixed: list[tuple[float, int]] = []
    flows: dict[int, Task] = {}
    waiting: set[int] = set()

    def ready(t: Task) -> bool:
        return all(tasks[d].end is not None and tasks[d].end <= now + 1e-15 for d in t.deps)

    def begin(t: Task) -> None:
        t.start = now
        work = sum(d for _, d in t.segments)
        node = t.rank // hw.devices_per_node
        copy = copy_gbps is not None and t.transfer  # a copy on the node's cores
        if cores is not None and not t.transfer and t.lane == "compute" and t.group is None and work > 0:
            t.cpu, t.nbytes = (("cpu", node), ("thread", t.rank)), work * 1e9
        elif copy:
            t.cpu = (("cpu", node),)
        if t.flow:
            # a copy's bytes flow as nanoseconds of a copy thread's work
            t.remaining, t.flowing_at = t.nbytes / (copy_gbps if copy else 1.0), now + t.latency
            flows[t.id] = t
        else:
            t.end = now + t.latency + sum(d for _, d in t.segments)
            heapq.heappush(fixed, (t.end, t.id))

    while left:
        started = True
        while started:
            started = False
            for lane, k in head.items():
                ids = g.lanes[lane]
                if k >= len(ids):
                    continue
                t = tasks[ids[k]]
                if t.start is not None or not ready(t):
                    continue
                if t.group is None:
                    begin(t)
                    started = True
                    continue
                waiting.add(t.id)
                members = g.groups[t.group]
                if all(m in waiting for m in members):
                    for m in members:
                        waiting.discard(m)
                        begin(tasks[m])
                    started = True
        if not fixed and not flows:
            stuck = [tasks[g.lanes[lane][k]] for lane, k in head.items() if k < len(g.lanes[lane])]
            raise RuntimeError(f"simulation deadlocked at {now:.6f} s; lane heads: "
                               f"{[(t.rank, t.lane, t.phase, t.step, t.block) for t in stuck[:6]]}")
        moving = [f for f in flows.values() if f.flowing_at <= now + 1e-15]
        rates = _fair_rates(moving, hw, cores or 1.0, copy_gbps) if moving else {}
        candidates = [fixed[0][0]] if fixed else []
        for f in flows.values():
            if f.flowing_at > now + 1e-15:
                candidates.append(f.flowing_at)
            else:
                candidates.append(now + f.remaining / rates[f.id] if rates[f.id] > 0 else float("inf"))
        nxt = max(now, min(candidates))
        for f in moving:
            f.remaining -= rates[f.id] * (nxt - now)
        now = nxt
        finished = []
        while fixed and fixed[0][0] <= now + 1e-12:
            finished.append(tasks[heapq.heappop(fixed)[1]])
        for fid, f in list(flows.items()):
            if f.flowing_at <= now + 1e-15 and f.remaining <= max(1.0, f.nbytes * 1e-9):
                f.end = now
                finished.append(f)
                del flows[fid]
        for t in finished:
            t.end = max(t.end, now) if t.end is not None else now
            head[(t.rank, t.lane)] += 1
            left -= 1


def spans_of(g: Graph) -> list[Span]:
    """The simulated run as span events (ns), one per segment of fixed work or per transfer."""
    out = []
    for t in g.tasks:
        if t.transfer:
            out.append(Span(t.rank, t.lane, t.phase, t.step, t.block, int(t.start * 1e9), int(t.end * 1e9),
                            int(t.nbytes)))
            continue
        at = t.start + t.latency
        total = sum(d for _, d in t.segments)
        stretch = (t.end - at) / total if t.cpu and total > 0 else 1.0  # processor-shared work ran slower
        if t.phase == "exchange" and t.group is not None:
            out.append(Span(t.rank, "exchange", "exchange", t.step, -1, int(t.start * 1e9), int(t.end * 1e9), 32))
            continue
        if t.group is not None or (t.latency > 0 and total == 0):
            # a collective inside a phase (an all-gather, a barrier) or a wait (_Program.wait, a shared
            # noise piece's fixed cost): real runs count it in that phase's span
            if t.segments and t.segments[0][0] is not None and t.end > t.start:
                out.append(Span(t.rank, t.lane, t.segments[0][0], t.step, t.block, int(t.start * 1e9),
                                int(t.end * 1e9)))
            continue
        for phase, d in t.segments:
            d *= stretch
            if d > 0 and phase is not None:  # None: work that real runs do not record as a span
                out.append(Span(t.rank, t.lane, phase, t.step, t.block, int(at * 1e9), int((at + d) * 1e9)))
            at += d
    return out


# -- results --------------------------------------------------------------------------------------
@dataclass
class Simulation:
    workload: Workload
    layout: Layout
    hardware: str
    threads: int
    spans: list[Span]
    step_ends: list[float]
    """End of each step's exchange on rank 0 (seconds)."""

    @property
    def step_s(self) -> float:
        """Steady-state seconds per step (after the first step)."""
        e = self.step_ends
        return (e[-1] - e[0]) / (len(e) - 1) if len(e) > 1 else e[0]

    @property
    def tokens_per_s(self) -> float:
        return self.layout.dp * self.workload.batch * self.workload.seq / self.step_s

    def steady_spans(self) -> list[Span]:
        """Spans inside the steady window (after step 0's exchange)."""
        t0 = int(self.step_ends[0] * 1e9)
        return [s for s in self.spans if s.start >= t0]

    def shares(self) -> dict[str, float]:
        """Share of each lane in the devices' total activity (busy time summed over lanes), mean over
        ranks: what an Nsight trace reports as the share of GPU activity per stream."""
        return activity_shares(self.steady_spans())

    def bottleneck(self) -> str:
        """The lane busiest over the steady window (on any rank)."""
        spans = self.steady_spans()
        busy = {lane: 0.0 for lane in LANES}
        for r in range(self.layout.world_size):
            for lane, v in overlap_metrics(spans, rank=r)["busy"].items():
                busy[lane] = max(busy[lane], v)
        return max(busy, key=busy.get)


def activity_shares(spans: list[Span]) -> dict[str, float]:
    """Per lane: busy seconds / busy seconds of all lanes, averaged over ranks."""
    from distzo2_lab.observe.events import lane_busy

    ranks = sorted({s.rank for s in spans})
    out = {lane: 0.0 for lane in LANES}
    for r in ranks:
        mine = [s for s in spans if s.rank == r]
        busy = {lane: lane_busy(mine, lane)[0] for lane in LANES}
        total = sum(busy.values()) or 1.0
        for lane in LANES:
            out[lane] += busy[lane] / total / len(ranks)
    return out


def simulate(w: Workload, layout: Layout, hw: Hardware, steps: int = 3, threads: int | None = None) -> Simulation:
    """Run `steps` simulated steps of `w` on `layout` over `hw`."""
    check_workload(w)
    if steps < 2:
        raise ValueError(f"steps={steps} is not valid; the steady state needs steps >= 2")
    if threads is None:
        threads = max(1, (hw.cores or 1) // layout.world_size) if hw.kind == "cpu" else 1
    peer = hw.per_world("peer_gbps_by_world", layout.world_size) if layout.world_size > 1 else None
    if peer is not None:  # the all-gather bandwidth measured among this many ranks
        hw = dataclasses.replace(hw, peer_gbps=peer)
    g = build_graph(w, layout, hw, steps, threads)
    shared = hw.kind == "cpu" and layout.world_size > 1
    run_graph(g, hw, cpu_cores(hw, threads, layout.world_size, model_shape(w.model).hidden) if shared else None)
    ends = sorted((t.step, t.end) for t in g.tasks if t.phase == "exchange" and t.rank == 0)
    return Simulation(w, layout, hw.name, threads, spans_of(g), [e for _, e in ends])
