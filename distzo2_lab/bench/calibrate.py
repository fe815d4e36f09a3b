"""`distzo2 plan calibrate`: measure this machine's rates and lanes into a hardware profile.

A few seconds of micro-benchmarks, each timing the package's own code path (block forwards at a
narrow and a wide width, the fixed costs of a pass, the embeddings and the head, the noise fill,
the perturb pass, copies, disk reads and writes), then real gloo process groups of 2 and 4 ranks
(barrier, loss exchange, all-gathers, shared noise, compute contention fitted to real steps). The
profile feeds the stream simulator (docs/planner.md) and is cached as DIR/this-machine.json.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time

import torch

from distzo2_lab.bench.efficiency import median_time
from distzo2_lab.bench.procstatus import status_kib
from distzo2_lab.plan.hardware import (
    DEFAULT_DIR,
    NARROW_WIDTH,
    THIS_MACHINE,
    WIDE_WIDTH,
    Hardware,
    calibration_path,
    save_profile,
)


def _probe_block(hidden: int, heads: int, ffn: int, batch: int, seq: int, device: str = "cpu", compute: str = "fp32"):
    """A one-block OPT adapter and its inputs: (run() doing one block pass, FLOPs of the pass); on
    `device`, under the engine's `compute` context (autocast for bf16 / fp16)."""
    from transformers import OPTConfig, OPTForCausalLM

    from distzo2_lab.models import OPTAdapter
    from distzo2_lab.zo.spsa import compute_context

    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads, ffn_dim=ffn,
                    word_embed_proj_dim=hidden, vocab_size=512, max_position_embeddings=max(seq, 32),
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, do_layer_norm_before=True)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):  # skip Hugging Face's init: any finite values time the same
        m = OPTForCausalLM(cfg)
    m.to_empty(device=device)
    with torch.no_grad():
        for prm in m.parameters():
            prm.normal_(0.0, 0.02)
    m.lm_head.weight = m.model.decoder.embed_tokens.weight
    a = OPTAdapter(m)
    ids = torch.randint(4, 512, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        h, ctx = a.embed(ids)
    matmul = sum(p.numel() for p in a.layers[0].parameters() if p.dim() == 2)
    flops = 2 * batch * seq * matmul + 4 * batch * seq * seq * hidden
    where = torch.device(device)

    def run():
        with torch.no_grad(), compute_context(compute, where):
            a.run_block(0, h, ctx)

    return run, flops


def _small_block():
    """The probe block at NARROW_WIDTH (the tiny preset's width and FFN, batch 8 x 32: the tiny
    shape's visits): the width-64 matmul rate, and the work between the probe's loss exchanges."""
    return _probe_block(NARROW_WIDTH, 4, 4 * NARROW_WIDTH, 8, 32)


def _wide_block():
    """The probe block at WIDE_WIDTH (OPT-125m's width and FFN, batch 2 x 64): the width-768 matmul
    rate, and the contention of ranks whose weights do not fit a core's own cache."""
    return _probe_block(WIDE_WIDTH, 12, 4 * WIDE_WIDTH, 2, 64)


def _probe_ends(device: str = "cpu") -> dict:
    """One pass of the resident-in modules (embeddings, positions, attention mask) of the tiny preset
    at the tiny shape, and one head pass (final norm, lm_head, loss) at batch 1 x 4: its fixed cost."""
    from distzo2_lab.models import OPTAdapter, build_model

    a = OPTAdapter(build_model("tiny").to(device))
    ids = torch.randint(4, 512, (8, 32), generator=torch.Generator().manual_seed(0)).to(device)
    few = ids[:1, :4]
    with torch.no_grad():
        h, ctx = a.embed(few)

    def embed():
        with torch.no_grad():
            a.embed(ids)

    def head():
        with torch.no_grad():
            a.loss(a.head(h, ctx), few)

    return {"embed": embed, "head": head}


def _unspanned(spans, steps: int) -> float:
    """Median seconds per step that rank 0's compute lane spends outside any span (the step's
    interval, from one step's end to the next, less the spans it recorded)."""
    return _step_parts(spans, steps)[0]


def _step_parts(spans, steps: int) -> tuple[float, float]:
    """(unspanned, whole): the medians over steps 2.. of rank 0's compute lane's time outside any
    span and of the step's interval (from one step's last compute span's end to the next's)."""
    ends, busy = {}, {}
    for s in spans:
        if s.rank == 0 and s.step >= 0 and s.lane == "compute":
            ends[s.step] = max(ends.get(s.step, 0), s.end)
            busy[s.step] = busy.get(s.step, 0) + s.end - s.start
    pairs = [(t, ends[t] - ends[t - 1]) for t in range(2, steps) if t in ends and t - 1 in ends]
    if not pairs:
        return 0.0, 0.0
    gap = statistics.median(interval - busy[t] for t, interval in pairs) / 1e9
    return max(0.0, gap), statistics.median(interval for _, interval in pairs) / 1e9


def _engine_run(model: str, tier: str, steps: int = 60, store: str | None = None,
                device: str = "cpu") -> tuple[float, float]:
    """(unspanned, whole) seconds per step of a real run (train(), one thread, batch 1 x 8, spans
    recorded): :func:`_step_parts`."""
    from distzo2_lab.config import OffloadConfig, TrainConfig, ZOConfig, validate
    from distzo2_lab.observe.events import Recorder
    from distzo2_lab.run.train import train

    rec = Recorder()
    cfg = validate(TrainConfig(model=model, steps=steps, batch_size=1, seq_len=8, threads=1, device=device,
                               zo=ZOConfig(lr=1e-5), offload=OffloadConfig(tier=tier, store=store)))
    train(cfg, progress=False, recorder=rec)
    return _step_parts(rec.spans, steps)


def engine_overheads(directory: str | None = None, device: str = "cpu") -> dict:
    """The fixed costs of a real step that the rates do not give (microseconds), from short real
    runs of the tiny preset (2 blocks) and tiny-deep (8 blocks) at batch 1 x 8, where they dominate:

    - `step_us`: once per step, outside any span: the training loop's own work (the batch, the
      step's seed and record, the seed log) and the engine's between its phases;
    - `block_us`: once per block visit, outside any span: the Python between a visit's spans (any
      tier);
    - `visit_us`: once per streamed visit on top, what streaming adds to a step beyond the resident
      run's, whole: the streamer's hand-off (request, waiting on the lanes' threads, binding the
      buffer to the block's parameters, the release) and the compute lane's spans slowed while
      the lanes' threads run (they take the interpreter's lock and the memory bus), so it is read
      from whole steps, not from the spans' gaps alone;
    - `disk_step_us` / `disk_visit_us`: the disk tier's on top of the host tier's, per step (the
      commit: the snapshot of the resident buckets, waiting for the previous commit) and per
      visit (the lanes' file reads and writes), with the store in `directory`, whole likewise.
    """
    run = lambda model, tier, store=None: _engine_run(model, tier, store=store, device=device)
    (short, short_step), (deep, deep_step) = run("tiny", "resident"), run("tiny-deep", "resident")
    streamed_step = run("tiny-deep", "host")[1]
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="calibrate-disk-", dir=directory) as tmp:
        disk_short = run("tiny", "disk", os.path.join(tmp, "a"))[1]
        disk_deep = run("tiny-deep", "disk", os.path.join(tmp, "b"))[1]
    block = max(0.0, (deep - short) / 6)
    visit = max(0.0, (streamed_step - deep_step) / 8)
    # beyond the host tier
    extra_short, extra_deep = disk_short - short_step - 2 * visit, disk_deep - deep_step - 8 * visit
    disk_visit = max(0.0, (extra_deep - extra_short) / 6)
    return {"step_us": max(0.0, short - 2 * block) * 1e6, "block_us": block * 1e6, "visit_us": visit * 1e6,
            "disk_step_us": max(0.0, extra_short - 2 * disk_visit) * 1e6, "disk_visit_us": disk_visit * 1e6}


def _threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _copy_gbps(nbytes: int, streams: int) -> float:
    """GB/s of `streams` concurrent copies into reused buffers (each of `nbytes`)."""
    n = nbytes // 4
    pairs = [(torch.empty(n), torch.ones(n)) for _ in range(streams)]
    for dst, src in pairs:
        dst.copy_(src)  # first touch

    def once():
        ts = [threading.Thread(target=dst.copy_, args=(src,)) for dst, src in pairs]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return streams * nbytes / median_time(once) / 1e9


def _disk_gbps(directory: str, nbytes: int) -> tuple[float, float]:
    """(read, write) GB/s of pread / pwrite of one file in `directory` (reads come from the page cache)."""
    os.makedirs(directory, exist_ok=True)
    buf = torch.ones(nbytes // 4)
    view = memoryview(buf.numpy()).cast("B")
    fd, path = tempfile.mkstemp(prefix="calibrate-", dir=directory)
    try:
        write = median_time(lambda: os.pwrite(fd, view, 0))
        out = bytearray(nbytes)
        read = median_time(lambda: os.preadv(fd, [out], 0))
    finally:
        os.close(fd)
        os.remove(path)
    return nbytes / read / 1e9, nbytes / write / 1e9


def _mean_time(fn, repeats: int) -> float:
    """Mean seconds of `fn` over one loop of `repeats` calls: unlike a median, it keeps the time
    slices a process loses when more ranks than cores take turns."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _window_time(fn, seconds: float) -> float:
    """Mean seconds of `fn` over the calls that fit in a fixed window of wall-clock time. Ranks
    timing a fixed number of calls finish apart, and the last ones then run with fewer rivals for
    the cores; with one window every rank competes from start to end."""
    t0 = time.perf_counter()
    n, now = 0, t0
    while now - t0 < seconds:
        fn()
        n += 1
        now = time.perf_counter()
    return (now - t0) / n


EXCHANGE_WORK, EXCHANGE_ROUNDS = 4, 60
"""Tiny forwards each rank runs before every timed loss exchange of the probe, and the rounds timed.
An exchange at the end of a step costs more than one back to back: ranks that went idle waiting
must be woken, and the ranks reach it apart. Each round times the call itself, as the engine's
exchange span does (subtracting the forwards' time from the round's would leave the difference of
two noisy times)."""


GATHER_BYTES = (1 << 20, 4 << 20, 16 << 20, 32 << 20)
"""Sizes (bytes gathered in all) of the probe's all-gathers: gloo between processes is not one
bandwidth (it falls where the buffers outgrow the caches), so the simulator interpolates the
measured times."""
GATHER_WARMUP, GATHER_REPEATS = 3, 7
"""Untimed and timed all-gathers of each size in the probe (the median of the timed ones)."""
WIDE_WINDOWS = 5
"""0.5 s windows of the wide block pass in the contention probe, alone and with every rank (~5 s)."""
FIT_STEPS, FIT_RUNS = 40, 3
"""Steps of each real run that the width-64 contention and the visit's cost are fitted to (its median
step after the first), and the runs of each (the median run): two tiny ranks on shared cores can
settle at one of two speeds for a whole run, so one run is one draw and the median of several is
taken."""


def fit_case(world: int, tier: str = "resident"):
    """The workload and layout whose real step at `world` ranks the width-64 contention (`tier`
    "resident") and the streamed visit's cost (`tier` "host") are fitted to: the tiny preset, batch
    16 x 16 per dp group (the benchmark's tiny rows run 8 x 32: as many tokens a pass, but no row of
    its table is the fit's own case), in PertP pairs (PertP at 2 ranks, 2D at 4; an odd number of
    ranks: DDP)."""
    from distzo2_lab.config import PrecisionConfig
    from distzo2_lab.parallel.layout import Layout
    from distzo2_lab.plan.memory import Workload

    w = Workload(model="tiny", batch=16, seq=16, precision=PrecisionConfig(), tier=tier, prefetch=1)
    pert = 2 if world % 2 == 0 else 1
    return w, Layout(dp=world // pert, pert=pert)


def _fit_run(rank: int, world: int) -> tuple[float, float]:
    """Seconds per step of the fit case run for real by the probe's ranks, resident and host: FIT_RUNS
    pairs of runs (a resident run, then a host run: a pair sees the same moments of the machine),
    rank 0's median step in each run, the median run of each tier."""
    from distzo2_lab.observe.events import Recorder
    from distzo2_lab.plan.check import steady_step, train_config
    from distzo2_lab.run.train import train

    steps = {"resident": [], "host": []}
    for _ in range(FIT_RUNS):
        for tier, got in steps.items():
            w, layout = fit_case(world, tier)
            rec = Recorder(rank=rank)
            train(train_config(w, layout, FIT_STEPS, 1), progress=False, recorder=rec, layout=layout, rank=rank)
            got.append(steady_step(rec.spans) or 0.0)
    return statistics.median(steps["resident"]), statistics.median(steps["host"])


def _bisect(step, measured_s: float, lo: float, hi: float, iters: int) -> float:
    """The x in [lo, hi] with step(x) == measured_s, step growing with x; held at a bound when even
    that bound's step is beyond the measured one."""
    if step(lo) >= measured_s:
        return lo
    if step(hi) <= measured_s:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step(mid) < measured_s else (lo, mid)
    return (lo + hi) / 2


def _fit_step(hw: Hardware, world: int, tier: str, **changes):
    """The simulated step of the fit case at `world` ranks on `hw` with `changes` made to it."""
    import dataclasses

    from distzo2_lab.plan.simulator import simulate

    w, layout = fit_case(world, tier)
    return simulate(w, layout, dataclasses.replace(hw, **changes), steps=8, threads=1).step_s


def fit_contention(hw: Hardware, world: int, measured_s: float, iters: int = 24) -> float:
    """The width-64 contention at `world` ranks with which the simulated step of the resident fit
    case equals `measured_s` (bisection: the simulated step grows with the factor). At least the
    plain share of the cores (W / cores, and 1.0: below it the factor changes nothing), held there
    when even that predicts a slower step; `world` (one core's worth among them) at most."""
    step = lambda factor: _fit_step(hw, world, "resident", contention={**hw.contention, world: factor})
    return _bisect(step, measured_s, max(1.0, world / (hw.cores or 1)), float(world), iters)


def fit_visit(hw: Hardware, world: int, measured_s: float, iters: int = 24) -> float:
    """The streamed visit's cost (us) at `world` ranks with which the simulated step of the host fit
    case equals `measured_s`, `hw`'s contention at `world` already fitted (the resident case has
    no visits, so the two fits do not depend on each other). Between 0 and `world` times the
    one-process figure (`visit_us`): one process measures a visit's hand-off and its lanes' threads
    slowing the compute lane, and the simulator slows it again when the ranks share the cores,
    which would count that slowing twice: the fit reads what a visit really costs at `world`."""
    step = lambda us: _fit_step(hw, world, "host", visit_us_by_world={**hw.visit_us_by_world, world: us})
    return _bisect(step, measured_s, 0.0, world * hw.visit_us, iters)


def gloo_probe(rank: int, world: int, q, nbytes: int, repeats: int, rounds: int = 300) -> dict:
    """One rank of the multi-process probe (gloo between real processes on this machine).

    Returns mean seconds over a few hundred rounds (~0.5 s each: the mean over the other jobs'
    comings and goings, not a snapshot, and the time slices a process loses when the ranks
    outnumber the cores): `busy_wide`, a block pass at WIDE_WIDTH while every rank runs it at once,
    over rank 0 running it alone (`alone_wide`; CPU contention: the median of 0.5 s windows); a
    barrier and a scalar all-gather back to back (a collective's fixed cost: the messages and waking
    W processes); `exchange`, the mean time of the scalar all-gather call at the end of
    EXCHANGE_WORK forwards in every rank (what the loss exchange costs a step: waking ranks that
    went idle, waiting for the ranks that arrive later); the median of an all-gather of each size in
    GATHER_BYTES and of nbytes (`curve`; the bandwidth is read at nbytes); `step`, the seconds per
    step of a real run of :func:`fit_case` in these ranks (the width-64 contention is fitted to it)
    and `streamed`, of its host-tier twin (the streamed visit's cost at W ranks is fitted to it)."""
    import torch.distributed as dist

    from distzo2_lab.parallel.exchange import all_gather_flat

    torch.set_num_threads(1)
    work, _ = _small_block()
    wide, _ = _wide_block()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def gather(n):
            mine, out = torch.ones(n), torch.empty(n * world)
            return lambda: all_gather_flat(out, mine)

        work(), dist.barrier(), gather(4)()  # warm: allocator, caches, connections
        dist.barrier()
        # a wide block (OPT-125m's width and batch 2 x 64): rank 0 alone (the others wait in a
        # barrier), then every rank at once, all through each window; the median window, like the
        # median step of the runs it predicts: a burst of another job's work spoils one window
        wide()
        dist.barrier()
        alone_wide = statistics.median(_window_time(wide, 0.5) for _ in range(WIDE_WINDOWS)) if rank == 0 else 0.0
        dist.barrier()
        busy_wide = statistics.median(_window_time(wide, 0.5) for _ in range(WIDE_WINDOWS))
        del wide
        dist.barrier()
        barrier = _mean_time(dist.barrier, rounds)
        exchange = gather(4)  # the loss exchange: 4 float64 per rank
        scalar = _mean_time(exchange, rounds)

        def after_work() -> float:  # as at the end of a step: every rank computes, then they exchange
            for _ in range(EXCHANGE_WORK):
                work()
            t0 = time.perf_counter()
            exchange()
            return time.perf_counter() - t0

        dist.barrier()
        # a fixed count of rounds (each ends in a collective, so every rank runs the same number),
        # each timed like the engine's exchange span: from this rank's call to its return. The mean,
        # not the median: most calls return quickly and a few wait for a rank that lost its core,
        # and a step pays those waits too
        ended = statistics.mean(after_work() for _ in range(EXCHANGE_ROUNDS))
        # warm-up calls per size first: gloo's first all-gathers of a size run slower, and a real
        # run's sliced visits gather the same buffer every visit, so the steady state is what they meet
        curve = [[total, median_time(gather(total // 4 // world), repeats=repeats, warmup=GATHER_WARMUP)]
                 for total in sorted(set(GATHER_BYTES) | {nbytes})]
        dist.barrier()
        share = _share_probe(rank, world, rounds)
        dist.barrier()
        step, streamed = _fit_run(rank, world)
        return {"alone_wide_s": alone_wide, "busy_wide_s": busy_wide, "barrier_s": barrier, "scalar_s": scalar,
                "exchange_s": ended, "share_s": share, "curve": curve, "step_s": step,
                "streamed_s": streamed}
    finally:
        dist.destroy_process_group()


def _share_probe(rank: int, world: int, rounds: int, chunk: int = 4096) -> float:
    """Mean seconds per shared noise piece of `world` chunks (noise_share.NoiseShare among the
    probe's ranks, all drawing the same pieces: arriving together, each draws one chunk) beyond
    drawing one chunk alone: claims, locks, waiting for the members drawing the others, polling.
    (A one-chunk piece is never shared: every member draws it alone.)"""
    import torch.distributed as dist

    from distzo2_lab.offload.tiers import SHM_DIR
    from distzo2_lab.parallel.node_share import NoiseShare
    from distzo2_lab.zo.perturb import Perturber

    p = Perturber("gaussian")
    one, buf = torch.empty(chunk), torch.empty(world * chunk)
    alone = median_time(lambda: p.fill(one, 1, "probe"), repeats=20, warmup=2)
    name = [os.urandom(8).hex() if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    share = NoiseShare(p, rank, world, dist.barrier, os.path.join(SHM_DIR, f"distzo2-probe-{name[0]}.bin"),
                       create=rank == 0, slot_elems=world * chunk, grain=chunk)
    try:
        k = iter(range(10**9))
        share.view(buf, 0, "probe")
        dist.barrier()
        return max(0.0, _mean_time(lambda: share.view(buf, next(k), "probe"), rounds) - alone)
    finally:
        share.close()


def probe_ranks(world: int, nbytes: int = 16 << 20, repeats: int = GATHER_REPEATS) -> dict:
    """Launch `world` ranks of :func:`gloo_probe`; medians over the ranks."""
    from distzo2_lab.parallel.launch import launch as start

    r = start(gloo_probe, world, (nbytes, repeats), timeout=180).wait()
    out = {k: statistics.median(v[k] for v in r.values())
           for k in ("barrier_s", "scalar_s", "exchange_s", "share_s")}
    out["alone_wide_s"], out["step_s"], out["streamed_s"] = r[0]["alone_wide_s"], r[0]["step_s"], r[0]["streamed_s"]
    out["busy_wide_s"] = statistics.median(v["busy_wide_s"] for v in r.values())
    out["curve"] = [[total, statistics.median(v["curve"][i][1] for v in r.values())]
                    for i, (total, _) in enumerate(r[0]["curve"])]
    out["big_s"] = next(t for total, t in out["curve"] if total == nbytes)  # the bandwidth probe's size
    return out


def _in_turns(fns: dict, rounds: int = 6, repeats: int = 8, warmup: int = 5, evict=None) -> dict:
    """Median seconds of each of `fns`, timed in turns: `rounds` rounds of `repeats` calls of each,
    the median over the rounds of each round's median. A fixed cost of a few hundred microseconds
    timed in one go is a snapshot of a few milliseconds of a machine whose speed moves (a fresh
    process reads it high); timed in turns, the fixed costs and the small block whose rate is taken
    against `launch` also see the same moments. `evict` (untimed) runs before every timed call: see
    :func:`_evict_caches`."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(median_time(fn, repeats=repeats, warmup=0, before=evict))
    return {k: statistics.median(v) for k, v in times.items()}


EVICT_BYTES = 8 << 20
"""Bytes written before each timed call of a fixed-cost probe: more than a core's L2 cache."""


def _evict_caches(nbytes: int = EVICT_BYTES):
    """A callable that writes `nbytes` (untimed, before each call of a fixed-cost probe). A real
    step never runs one pass twice in a row: between two block passes the engine draws noise,
    perturbs, runs the other blocks and its own Python, and the pass finds its weights, its
    activations and its code out of the caches. Timed back to back, a pass reads faster than it
    runs inside a step; after the caches are overwritten it reads what a step sees."""
    buf = torch.empty(nbytes // 4)
    return lambda: buf.fill_(1.0)


def calibrate(directory: str = DEFAULT_DIR, collectives: bool = True, cores: int | None = None,
              worlds: tuple[int, ...] = (2, 4), save: bool = True) -> Hardware:
    """Measure this machine (a few seconds; the multi-process probes at each of `worlds` ranks add
    several seconds each) and write DIR/this-machine.json (save=False: only return it, e.g. a calibration taken
    beside one measurement); returns the profile."""
    import transformers  # noqa: F401  (the baseline RSS counts torch and transformers)

    baseline = (status_kib("VmRSS") or 0) * 1024
    cores = cores or len(os.sched_getaffinity(0))
    big, big_flops = _wide_block()
    small, small_flops = _small_block()
    tiny, _ = _probe_block(64, 4, 256, 1, 4)
    fixed = _threads(1, lambda: _in_turns({"launch": tiny, "small": small, **_probe_ends()}, evict=_evict_caches()))
    launch = fixed["launch"]
    t1 = _threads(1, lambda: median_time(big, repeats=7))
    tc = _threads(cores, lambda: median_time(big, repeats=7))
    rate1 = big_flops / max(t1 - launch, 1e-6)
    rate_small = small_flops / max(fixed["small"] - launch, 1e-6)
    scaling = (big_flops / max(tc - launch, 1e-6)) / (rate1 * cores)
    embed_us, head_us = fixed["embed"] * 1e6, fixed["head"] * 1e6
    overheads = _threads(1, lambda: engine_overheads(directory))
    from distzo2_lab.zo.perturb import Perturber
    from distzo2_lab.zo.spsa import perturb_

    n = 1 << 21
    z = torch.empty(n)
    p = Perturber("gaussian")
    few = torch.empty(64)
    noise = _threads(1, lambda: _in_turns({"rng": lambda: p.fill(z, 1, "calibrate"),
                                           "call": lambda: (p.fill(few, 1, "calibrate"), perturb_(few, few, 1e-3))},
                                          repeats=4))
    rng, call_us = n / noise["rng"] / 1e9, noise["call"] / 2 * 1e6
    n = 1 << 24  # 64 MB per operand: beyond the caches, like a block's master and z
    z, master = torch.ones(n), torch.zeros(n)
    axpy = 12 * n / _threads(1, lambda: median_time(lambda: perturb_(master, z, 1e-3))) / 1e9
    h2d = _copy_gbps(64 << 20, 1)
    shared = _copy_gbps(64 << 20, 2)
    disk_read, disk_write = _disk_gbps(directory, 64 << 20)
    latency_us, peer = 200.0, 1.0
    barrier_us, collective_us, share_us, contention, peer_by_world, gather_curve = {}, {}, {}, {1: 1.0}, {}, {}
    contention_wide, fit_steps = {1: 1.0}, {}
    if collectives:
        for world in worlds:
            r = probe_ranks(world)
            barrier_us[world] = r["barrier_s"] * 1e6
            collective_us[world] = r["exchange_s"] * 1e6
            share_us[world] = r["share_s"] * 1e6
            # each rank receives (W - 1) / W of the 16 MB gathered
            peer_by_world[world] = (world - 1) / world * (16 << 20) / max(r["big_s"] - r["scalar_s"], 1e-6) / 1e9
            gather_curve[world] = r["curve"]
            fit_steps[world] = r["step_s"], r["streamed_s"]
            contention_wide[world] = max(1.0, r["busy_wide_s"] / r["alone_wide_s"])
            if world == 2:
                latency_us = r["scalar_s"] * 1e6
                peer = peer_by_world[world]  # each of 2 ranks receives half
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    hw = Hardware(
        name=THIS_MACHINE, description=f"this machine: {cores} cores, measured by distzo2 plan calibrate",
        kind="cpu", device_memory_gb=mem_total, host_memory_gb=mem_total, devices_per_node=64,
        matmul_tflops={"fp32": rate1 / 1e12}, matmul_efficiency=1.0, memory_gbps=axpy, rng_gsamples=rng,
        launch_us=launch * 1e6, h2d_gbps=h2d, d2h_gbps=h2d, link_latency_us=5.0, devices_per_switch=1,
        switch_gbps=None, host_gbps=shared, peer_gbps=peer, peer_latency_us=latency_us,
        disk_read_gbps=disk_read, disk_write_gbps=disk_write, context_gb=baseline / 1e9, cores=cores,
        thread_scaling=min(1.0, scaling), rate_by_width={NARROW_WIDTH: rate_small / 1e12, WIDE_WIDTH: rate1 / 1e12},
        call_us=call_us, embed_us=embed_us, head_us=head_us, **overheads, barrier_us=barrier_us,
        collective_us=collective_us, share_us=share_us, peer_gbps_by_world=peer_by_world, gather_curve=gather_curve,
        contention=contention, contention_wide=contention_wide,
        source=f"calibrated {time.strftime('%Y-%m-%d %H:%M:%S')} (load average {os.getloadavg()[0]:.2f}); "
               "fp32 rate per thread; noise, perturb and copy rates per thread")
    # the other figures first: the fits simulate with them
    for world, (resident, streamed) in sorted(fit_steps.items()):
        hw.contention[world] = fit_contention(hw, world, resident)
        hw.contention_fit_us[world] = resident * 1e6
        hw.visit_us_by_world[world] = fit_visit(hw, world, streamed)
        hw.visit_fit_us[world] = streamed * 1e6
    if save:
        save_profile(hw, calibration_path(directory))
    return hw
