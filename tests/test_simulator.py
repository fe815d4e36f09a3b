"""The stream simulator: the engine's dependencies, shared links, all-gather cost, span output,
the published DistZO2 figures, and a loose bound against real runs here."""
from __future__ import annotations

import dataclasses

import pytest

from distzo2_lab.config import ConfigError, PrecisionConfig
from distzo2_lab.observe.events import chrome_trace, overlap_metrics
from distzo2_lab.observe.viz import compare_timelines, timeline_figure
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan import PROFILES, simulate
from distzo2_lab.plan.memory import Workload, model_shape, padded_block
from distzo2_lab.plan.paper import headline, trace_shares, zo2_workload

A100 = PROFILES["a100-80g-sxm"]


def _by(spans, lane, phase=None):
    return {(s.rank, s.step, s.block): s for s in spans if s.lane == lane and (phase is None or s.phase == phase)}


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_visits_wait_for_uploads_and_the_pool_bounds_blocks_in_flight(prefetch):
    w = dataclasses.replace(zo2_workload("opt-1.3b"), prefetch=prefetch)
    sim = simulate(w, Layout(), A100, steps=3)
    up, off = _by(sim.spans, "upload"), _by(sim.spans, "offload")
    fwd = {}
    for s in sim.spans:
        if s.lane == "compute" and s.block >= 0:
            a, b = fwd.get((s.rank, s.step, s.block), (s.start, s.end))
            fwd[s.rank, s.step, s.block] = (min(a, s.start), max(b, s.end))
    n = 24
    for key, (start, end) in fwd.items():
        assert start >= up[key].end  # acquire waits for the upload
        assert off[key].start >= end  # the write-back starts after the visit
    # at no moment more than prefetch + 2 blocks between upload start and write-back end
    events = sorted([(s.start, 1) for s in up.values()] + [(s.end, -1) for s in off.values()])
    held = peak = 0
    for _, d in events:
        held += d
        peak = max(peak, held)
    assert peak <= prefetch + 2
    # a block is never read while its previous write-back is in flight
    for (r, t, i), s in up.items():
        if t > 0:
            assert s.start >= off[r, t - 1, i].end
    assert len(up) == 3 * n


def test_prefetch_hides_uploads_under_compute():
    w = zo2_workload("opt-1.3b", batch=8)
    slow = simulate(dataclasses.replace(w, prefetch=0), Layout(), A100)
    fast = simulate(w, Layout(), A100)
    assert fast.step_s < slow.step_s
    assert overlap_metrics(fast.steady_spans())["hidden_fraction"] > overlap_metrics(slow.steady_spans())[
        "hidden_fraction"]


def test_a_shared_host_link_slows_every_device_behind_it():
    w = zo2_workload("opt-1.3b")
    narrow = dataclasses.replace(A100, host_gbps=24.0, devices_per_switch=1, switch_gbps=None)
    one = simulate(w, Layout(), narrow)
    four = simulate(w, Layout(dp=4), narrow)
    up1 = min(s.seconds for s in one.spans if s.lane == "upload")
    up4 = min(s.seconds for s in four.steady_spans() if s.lane == "upload")
    assert up4 > 3.0 * up1  # four uploads (and four write-backs) share 24 GB/s


def test_nvlink_allgather_cost_follows_the_shard_count():
    w = zo2_workload("opt-13b")
    cost = {}
    for world in (2, 4, 8):
        sim = simulate(w, Layout(dp=world, slice=True), A100, steps=2)
        cost[world] = min(s.seconds for s in sim.spans if s.phase == "allgather")
    for world, seconds in cost.items():
        block_bytes = 2 * padded_block(model_shape("opt-13b"), world, True)  # fp16, padded to equal shards
        expected = (world - 1) / world * block_bytes / (A100.peer_gbps * 1e9)
        assert seconds == pytest.approx(expected + (world - 1) * A100.peer_latency_us * 1e-6, rel=0.1)
    assert cost[2] < cost[4] < cost[8]


def test_without_nvlink_the_allgather_crosses_the_host():
    w = zo2_workload("opt-1.3b")
    nv = simulate(w, Layout(dp=2, slice=True), A100)
    pcie = simulate(w, Layout(dp=2, slice=True), PROFILES["rtx4090"])
    gather = {name: min(s.seconds for s in sim.spans if s.phase == "allgather") for name, sim in
              (("nvlink", nv), ("pcie", pcie))}
    assert gather["pcie"] > 5 * gather["nvlink"]


def test_pertp_halves_the_forwards_of_each_rank():
    w = zo2_workload("opt-1.3b")
    single = simulate(w, Layout(), A100)
    pert = simulate(w, Layout(pert=2), A100)
    n_fwd = {name: sum(1 for s in sim.steady_spans() if s.phase == "forward" and s.rank == 0)
             for name, sim in (("single", single), ("pert", pert))}
    assert n_fwd["single"] == 2 * n_fwd["pert"]


def test_simulated_spans_work_in_every_view_of_real_runs():
    sim = simulate(Workload(model="tiny", batch=2, seq=16, precision=PrecisionConfig(), tier="host"),
                   Layout(dp=2, slice=True), A100)
    m = overlap_metrics(sim.spans)
    assert set(m["busy"]) >= {"upload", "compute", "offload", "exchange"}
    trace = chrome_trace(sim.spans)
    assert any(e.get("name") == "allgather" for e in trace["traceEvents"])
    fig = timeline_figure(sim.spans)
    assert len(fig.data) >= 4
    both = compare_timelines({"predicted": sim.spans, "measured": sim.spans})
    assert any("predicted" in str(y) for t in both.data for y in t.y)


def test_disk_tier_is_slower_than_host_when_the_disk_is_slow():
    w = zo2_workload("opt-1.3b", batch=8)
    slow_disk = dataclasses.replace(A100, disk_read_gbps=1.0, disk_write_gbps=1.0)
    host = simulate(w, Layout(), slow_disk)
    disk = simulate(dataclasses.replace(w, tier="disk"), Layout(), slow_disk)
    assert disk.step_s > 2 * host.step_s
    assert any(s.phase == "commit" for s in disk.spans)


def test_distzo2_trace_shares_on_opt_1_3b():
    rows = {r["case"]: r["simulated"] for r in trace_shares(steps=2)}
    pertp, ddp = rows["2 GPUs NVLink, PertP"], rows["2 GPUs NVLink, DDP"]
    naive, sliced = rows["4 GPUs PertP+DDP, no slicing"], rows["4 GPUs PertP+DDP, slicing"]
    assert 0.30 < pertp < 0.48 and 0.45 < ddp < 0.65 and pertp < ddp  # published ~39 % and ~55 %
    assert 0.12 < naive < 0.28 and 0.36 < sliced < 0.56 and sliced > 1.7 * naive  # ~19 % and ~45 %


def test_distzo2_about_3x_zo2_on_opt_175b():
    h = headline()
    assert 2.2 < h["speedup"] < 4.0, h["speedup"]


def test_predicted_step_time_within_3x_of_measured_here(tmp_path):
    """A loose bound only (the benchmark prints the 15 % table): tiny model, host tier, one rank and
    two PertP ranks (gloo between processes: the calibrated barrier and contention; a tiny block
    fits one noise chunk, so the ranks draw alone).
    Identical runs of these 10-20 ms steps moved by 2x on this shared machine (9.4 vs 23.9 ms), and
    a run beside another job measured the one-rank case at twice its prediction (9.0 vs 18.5 ms), so
    the bound is 3x both ways."""
    from distzo2_lab.bench.calibrate import calibrate
    from distzo2_lab.plan.check import compare

    hw = calibrate(str(tmp_path / "plan"), worlds=(2,))  # a directory that does not exist yet
    assert set(map(int, hw.barrier_us)) == {2} and hw.collective_us and hw.contention
    # the loss exchange is timed at the end of work (never below the back-to-back all-gather)
    assert hw.collective_us[2] >= hw.peer_latency_us > 0
    assert set(map(int, hw.share_us)) == {2} and hw.share_us[2] >= 0  # one shared noise piece, beyond its draw
    assert set(map(int, hw.peer_gbps_by_world)) == {2} and hw.peer_gbps_by_world[2] > 0
    assert [b for b, _ in hw.gather_curve[2]] == [1 << 20, 4 << 20, 16 << 20, 32 << 20]
    assert all(t > 0 for _, t in hw.gather_curve[2])
    assert hw.contention[2] >= 1.0 and hw.contention_wide[2] >= 1.0  # the tiny pass's and a width-768 pass's
    # the width-64 contention reproduces the real step it was fitted to (unless held at a bound),
    # and the streamed visit's cost at 2 ranks the real host step, likewise
    from distzo2_lab.bench.calibrate import fit_case

    for tier, value, lo, hi, real_us in (("resident", hw.contention[2], 1.0, 2.0, hw.contention_fit_us),
                                          ("host", hw.visit_us_by_world[2], 0.0, 2 * hw.visit_us, hw.visit_fit_us)):
        assert set(map(int, real_us)) == {2} and real_us[2] > 0
        fitted = simulate(*fit_case(2, tier), hw, steps=8, threads=1).step_s
        real = real_us[2] * 1e-6
        if lo < value < hi:
            assert fitted == pytest.approx(real, rel=0.02)
        else:  # held at a bound: the simulated step is on that bound's side
            assert fitted >= real if value == lo else fitted <= real
    assert hw.step_us > 0 and hw.block_us >= 0 and hw.visit_us >= 0
    w = Workload(model="tiny", batch=8, seq=32, precision=PrecisionConfig(), tier="host")
    r = compare(w, Layout(), hw, steps=8, threads=1)  # the median of 7 steps: one burst does not count
    assert 1 / 3 < r["ratio"] < 3.0, (r["predicted_s"], r["measured_s"])
    overlay = compare_timelines({"predicted": r["simulation"].steady_spans(),
                                 "measured": [s for s in r["measured"].spans if s.step >= 1]})
    assert len(overlay.data) >= 3
    # two processes on the 2 shared cores
    r = compare(w, Layout(pert=2), hw, steps=8, threads=1)
    assert 1 / 3 < r["ratio"] < 3.0, (r["predicted_s"], r["measured_s"])


def test_contention_is_fitted_to_a_real_step_of_ranks_stepping_together():
    """calibrate.fit_contention: the width-64 factor with which the simulated fit case (tiny,
    resident, PertP pairs) takes the given step; held at the plain share of the cores (W / cores, at
    least 1) below the step that share gives, and at one core's worth (W) above the slowest."""
    from distzo2_lab.bench.calibrate import fit_case, fit_contention

    assert fit_case(2)[1] == Layout(1, 2) and fit_case(4)[1] == Layout(2, 2) and fit_case(3)[1] == Layout(3, 1)
    w, layout = fit_case(2)
    assert (w.model, w.tier, w.batch, w.seq) == ("tiny", "resident", 16, 16)  # not a row of the benchmark
    hw = _cpu(contention={2: 1.0}, barrier_us={2: 0.0}, collective_us={2: 300.0})

    def step(factor):
        return simulate(w, layout, dataclasses.replace(hw, contention={2: factor}), steps=8, threads=1).step_s

    assert step(1.0) < step(1.5) < step(2.0)  # the simulated step grows with the factor
    for factor in (1.3, 1.7):
        assert fit_contention(hw, 2, step(factor)) == pytest.approx(factor, abs=0.02)
    assert fit_contention(hw, 2, 0.5 * step(1.0)) == 1.0
    assert fit_contention(hw, 2, 10 * step(2.0)) == 2.0
    # 4 ranks on 2 cores: below 2x the factor changes nothing (each rank gets half a core anyway)
    w4, layout4 = fit_case(4)
    quad = _cpu(contention={4: 2.0}, barrier_us={4: 0.0}, collective_us={4: 300.0})
    floor = simulate(w4, layout4, quad, steps=8, threads=1).step_s
    assert fit_contention(quad, 4, 0.5 * floor) == 2.0
    slower = simulate(w4, layout4, dataclasses.replace(quad, contention={4: 3.0}), steps=8, threads=1).step_s
    assert fit_contention(quad, 4, slower) == pytest.approx(3.0, abs=0.03)


def test_visit_cost_at_several_ranks_is_fitted_to_a_real_host_step():
    """calibrate.fit_visit: the streamed visit's cost at W ranks with which the simulated host-tier
    fit case takes the given step (the contention at W fitted before it); held at 0 and at W times
    the one-process figure; the simulator uses it at W ranks only (one rank: `visit_us`), between
    fitted world sizes interpolated."""
    from distzo2_lab.bench.calibrate import fit_case, fit_visit

    w, layout = fit_case(2, "host")
    assert (w.model, w.tier, w.batch, w.seq) == ("tiny", "host", 16, 16) and layout == Layout(1, 2)
    hw = _cpu(contention={2: 1.3}, barrier_us={2: 0.0}, collective_us={2: 300.0})

    def step(us, world=2, lay=layout):
        return simulate(w, lay, dataclasses.replace(hw, visit_us_by_world={world: us}), steps=8, threads=1).step_s

    assert step(0.0) < step(300.0) < step(600.0)  # the simulated step grows with the visit's cost
    for us in (120.0, 450.0):
        assert fit_visit(hw, 2, step(us)) == pytest.approx(us, abs=2.0)
    assert fit_visit(hw, 2, 0.5 * step(0.0)) == 0.0
    assert fit_visit(hw, 2, 10 * step(600.0)) == 600.0  # 2 x visit_us
    # the resident case has no visits: its step does not move with the figure
    res = fit_case(2)
    assert simulate(*res, dataclasses.replace(hw, visit_us_by_world={2: 0.0}), steps=8, threads=1).step_s \
        == simulate(*res, dataclasses.replace(hw, visit_us_by_world={2: 900.0}), steps=8, threads=1).step_s
    # one rank keeps the one-process figure; 3 ranks lie between the fits at 2 and 4
    assert step(0.0, lay=Layout()) == step(900.0, lay=Layout())
    both = dataclasses.replace(hw, visit_us_by_world={2: 100.0, "4": 300.0})  # a key read back from JSON
    assert (both.visit_at(1), both.visit_at(2), both.visit_at(3), both.visit_at(4)) == (300.0, 100.0, 200.0, 300.0)
    assert _cpu().visit_at(2) == 300.0  # nothing fitted: the one-process figure


def _cpu(**changes):
    """A CPU node described by hand (what `distzo2 plan calibrate` writes for this machine)."""
    base = dict(name="cpu-test", description="two-core test node", kind="cpu", device_memory_gb=32.0,
                host_memory_gb=32.0, devices_per_node=64, matmul_tflops={"fp32": 0.05}, matmul_efficiency=1.0,
                memory_gbps=20.0, rng_gsamples=0.15, launch_us=300.0, h2d_gbps=7.0, d2h_gbps=7.0, host_gbps=10.0,
                peer_gbps=0.5, peer_latency_us=400.0, disk_read_gbps=2.0, disk_write_gbps=5.0, cores=2,
                call_us=15.0, embed_us=100.0, visit_us=300.0)
    base.update(changes)
    from distzo2_lab.plan import Hardware

    return Hardware(**base)


def _busy(sim, rank, phase):
    return sum(s.seconds for s in sim.steady_spans() if s.rank == rank and s.phase == phase)


def test_fixed_costs_outside_the_spans_add_to_every_step_and_visit():
    """step_us once per step, block_us once per block visit, visit_us once per streamed visit: time
    the real runs spend outside any span, so the simulator's spans do not show them either."""
    hw = _cpu(step_us=0.0, block_us=0.0, visit_us=0.0)
    n = model_shape("tiny").layers
    for tier, visit in (("resident", 0.0), ("host", 400.0)):
        w = Workload(model="tiny", batch=1, seq=8, precision=PrecisionConfig(), tier=tier)
        base = simulate(w, Layout(), dataclasses.replace(hw, visit_us=visit))
        more = simulate(w, Layout(), dataclasses.replace(hw, step_us=700.0, block_us=300.0, visit_us=visit))
        assert more.step_s - base.step_s == pytest.approx((700 + n * 300) * 1e-6, rel=0.02)
        busy = [sum(s.seconds for s in sim.steady_spans() if s.lane == "compute") for sim in (base, more)]
        assert busy[1] == pytest.approx(busy[0], rel=1e-6)
    host = simulate(Workload(model="tiny", batch=1, seq=8, precision=PrecisionConfig(), tier="host"), Layout(), hw)
    later = simulate(Workload(model="tiny", batch=1, seq=8, precision=PrecisionConfig(), tier="host"), Layout(),
                     dataclasses.replace(hw, visit_us=900.0))
    assert later.step_s - host.step_s == pytest.approx(n * 900e-6, rel=0.02)
    # the disk tier's own: per step (one rank's commit) and per visit (the lanes' file I/O)
    disk = Workload(model="tiny", batch=1, seq=8, precision=PrecisionConfig(), tier="disk")
    plain = simulate(disk, Layout(), hw)
    more = simulate(disk, Layout(), dataclasses.replace(hw, disk_step_us=800.0, disk_visit_us=200.0))
    assert more.step_s - plain.step_s == pytest.approx((800 + n * 200) * 1e-6, rel=0.02)
    assert simulate(dataclasses.replace(disk, tier="host"), Layout(), dataclasses.replace(
        hw, disk_step_us=800.0, disk_visit_us=200.0)).step_s == pytest.approx(host.step_s)


def test_the_head_pass_has_its_own_fixed_cost():
    """A head pass (final norm, lm_head, loss) is a few operations where a block pass runs a dozen:
    its fixed cost is `head_us` (calibrated), `launch_us` only where a profile has none."""
    w = Workload(model="tiny", batch=1, seq=8, precision=PrecisionConfig(), tier="resident")
    head = {us: sum(s.seconds for s in simulate(w, Layout(), _cpu(head_us=us)).steady_spans() if s.phase == "head")
            for us in (None, 300.0, 80.0)}
    assert head[None] == pytest.approx(head[300.0])  # launch_us=300: the fallback
    per_step = 2 * (300 - 80) * 1e-6  # two head passes a step
    steps = len({s.step for s in simulate(w, Layout(), _cpu()).steady_spans()})
    assert head[300.0] - head[80.0] == pytest.approx(steps * per_step, rel=0.02)


@pytest.mark.parametrize("perturb", ["in-place", "copy"])
def test_real_and_simulated_steps_record_the_same_compute_phases(perturb):
    """Every piece of a step the simulator charges has a span in a real run, and the other way round
    (the block perturb passes or perturbed copies: 'perturb'), so the calibrated time outside any
    span (`block_us`, `step_us`) does not hold what the simulator charges again."""
    from distzo2_lab.plan.check import measure

    w = Workload(model="tiny", batch=2, seq=8, precision=PrecisionConfig(), tier="host", perturb=perturb)
    real = measure(w, Layout(), steps=3, threads=1)
    sim = simulate(w, Layout(), _cpu(), steps=3)

    def phases(spans):
        return {s.phase for s in spans if s.lane == "compute" and s.step >= 1}

    # in place: z drawn ('rng'), three perturb passes; copies: the fused pass is the 'update' span
    expected = {"forward", "update", "embed", "head"} | ({"perturb", "rng"} if perturb == "in-place" else set())
    assert phases(real.spans) == phases(sim.spans) >= expected


def test_engine_overheads_are_measured_from_real_runs():
    """calibrate.engine_overheads: short real train() runs of tiny (2 blocks) and tiny-deep (8)."""
    from distzo2_lab.bench.calibrate import _step_parts, _unspanned, engine_overheads
    from distzo2_lab.observe.events import Span

    # the gap of a step: its interval less its compute spans (rank 0); the median over steps
    spans = [Span(0, "compute", "forward", t, 0, t * 10_000, t * 10_000 + 6_000) for t in range(6)]
    spans += [Span(0, "upload", "upload", t, 0, t * 10_000, t * 10_000 + 9_000) for t in range(6)]  # other lanes
    assert _unspanned(spans, 6) == pytest.approx(4e-6)
    # and the whole step (a streamed visit's cost is the streamed run's whole step less the resident one's)
    assert _step_parts(spans, 6) == (pytest.approx(4e-6), pytest.approx(10e-6))
    got = engine_overheads()
    assert set(got) == {"step_us", "block_us", "visit_us", "disk_step_us", "disk_visit_us"}
    assert got["step_us"] > 0 and all(v >= 0 for v in got.values())


def test_fixed_cost_probes_run_with_the_caches_evicted_before_each_timed_call():
    """calibrate._in_turns(evict=...): a real step never runs one pass twice in a row, so the
    fixed-cost probes find the caches written over before every timed call (untimed)."""
    from distzo2_lab.bench.calibrate import _in_turns

    order = []
    got = _in_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2, repeats=3,
                    warmup=1, evict=lambda: order.append("evict"))
    assert set(got) == {"a", "b"} and all(v >= 0 for v in got.values())
    timed = order[2:]  # after one warm-up call of each
    assert timed == ["evict", "a"] * 3 + ["evict", "b"] * 3 + ["evict", "a"] * 3 + ["evict", "b"] * 3


def test_a_measured_gather_curve_times_the_sliced_all_gathers():
    """CPU: gloo's all-gather time is not linear in its size here (the buffers outgrow the caches),
    so a measured {W: [[bytes, seconds]]} curve times each sliced all-gather, interpolated."""
    curve = {4: [[1 << 20, 0.006], [16 << 20, 0.020], [32 << 20, 0.078]]}
    hw = _cpu(collective_us={4: 3000.0}, barrier_us={4: 2000.0}, gather_curve=curve)
    assert hw.gather_s(4, 16 << 20) == pytest.approx(0.020)
    assert hw.gather_s(4, 24 << 20) == pytest.approx(0.049)
    assert hw.gather_s(4, 48 << 20) == pytest.approx(0.078 + 0.058)  # beyond: the last two's slope
    assert hw.gather_s(4, 0) == pytest.approx(0.003)  # the collective's fixed cost
    assert hw.gather_s(2, 1 << 20) is None
    for model in ("tiny", "opt-125m"):
        w = Workload(model=model, batch=1, seq=8, precision=PrecisionConfig(), tier="host")
        sim = simulate(w, Layout(dp=2, pert=2, slice=True), hw, steps=2)
        total = padded_block(model_shape(model), 4, True) * 4
        gathers = {round(s.seconds, 6) for s in sim.spans if s.phase == "allgather"}
        assert gathers == {round(hw.gather_s(4, total), 6)}
    assert simulate(w, Layout(dp=2, pert=2, slice=True), _cpu(collective_us={4: 3000.0}), steps=2).step_s \
        != sim.step_s  # without the curve: the bandwidth model


def test_measured_collective_costs_are_read_per_world_size():
    hw = _cpu(barrier_us={2: 500.0, 4: 1500.0}, collective_us={"2": 700.0})
    assert hw.sync_s("barrier", 2) == pytest.approx(500e-6)
    assert hw.sync_s("barrier", 3) == pytest.approx(1000e-6)  # linear between the measured worlds
    assert hw.sync_s("barrier", 8) == pytest.approx(3500e-6)  # and beyond them
    assert hw.sync_s("gather", 4) == pytest.approx(700e-6)  # one measured world: its value
    assert hw.sync_s("barrier", 1) == 0.0
    assert _cpu().sync_s("gather", 3) == pytest.approx(2 * 400e-6)  # nothing measured: (W - 1) latencies
    # the loss exchange of a simulated 2-rank run lasts the measured all-gather
    w = Workload(model="tiny", batch=2, seq=16, precision=PrecisionConfig(), tier="resident")
    sim = simulate(w, Layout(dp=2, share_noise=False), hw)
    assert min(s.seconds for s in sim.spans if s.phase == "exchange") == pytest.approx(700e-6, rel=1e-3)


def test_ranks_beyond_the_cores_share_them_moment_by_moment():
    """Processor sharing: four single-threaded ranks on two cores run their compute at half speed;
    a measured contention lowers the cores the ranks get."""
    from distzo2_lab.plan.simulator import cpu_cores

    w = Workload(model="tiny", batch=8, seq=32, precision=PrecisionConfig(), tier="resident")
    hw = _cpu(barrier_us={2: 0.0, 4: 0.0}, collective_us={2: 0.0, 4: 0.0})
    one = simulate(w, Layout(), hw, threads=1)
    four = simulate(w, Layout(dp=4, share_noise=False), hw, threads=1)
    fwd1, fwd4 = _busy(one, 0, "forward"), _busy(four, 0, "forward")
    assert fwd4 == pytest.approx(2 * fwd1, rel=0.05)
    assert cpu_cores(hw, 1, 4) == 2.0
    assert cpu_cores(_cpu(contention={2: 1.0, 4: 4.0}), 1, 4) == 1.0  # 4 ranks each 4x slower: one core's worth
    assert cpu_cores(_cpu(contention={2: 1.0, 4: 4.0}), 1, 2) == 2.0
    # wide blocks share the L3 and the memory bus: the factor measured at WIDE_WIDTH, log width between
    both = _cpu(contention={2: 1.0}, contention_wide={2: 1.25})
    assert cpu_cores(both, 1, 2, 64) == 2.0
    assert cpu_cores(both, 1, 2, 768) == pytest.approx(2 / 1.25)
    assert cpu_cores(both, 1, 2, 4096) == pytest.approx(2 / 1.25)  # held beyond the measured widths
    assert 2 / 1.25 < cpu_cores(both, 1, 2, 256) < 2.0
    opt = Workload(model="opt-125m", batch=2, seq=64, precision=PrecisionConfig(), tier="resident")
    quiet = dict(contention={2: 1.0}, barrier_us={2: 0.0}, collective_us={2: 0.0})
    narrow = simulate(opt, Layout(pert=2), _cpu(**quiet), threads=1)
    shared = simulate(opt, Layout(pert=2), _cpu(**quiet, contention_wide={2: 1.25}), threads=1)
    assert _busy(shared, 0, "forward") == pytest.approx(1.25 * _busy(narrow, 0, "forward"), rel=0.05)
    slow = simulate(w, Layout(dp=4, share_noise=False), _cpu(contention={4: 4.0}, barrier_us={4: 0.0},
                                                               collective_us={4: 0.0}), threads=1)
    assert _busy(slow, 0, "forward") == pytest.approx(4 * fwd1, rel=0.05)


FAST_COPIES = dict(h2d_gbps=1e4, d2h_gbps=1e4, host_gbps=1e4)
"""A CPU node's copies so fast that the cores they take are nothing beside the compute."""


def test_copies_share_the_cores_with_the_ranks_compute():
    """On a CPU node an upload or a write-back is a memory copy run by a lane's thread on one of the
    cores the ranks compute on. One rank leaves the other core to its copies: the host step is the
    resident one (plus the visits' fixed costs) whatever the copies cost. Two ranks on two cores
    already fill them, so each rank's step grows by about its copies' core time (OPT-125m's 28 MB
    blocks here: a host step 55-80 ms over the resident one at 2 ranks, 5-7 ms at one)."""
    quiet = _cpu(contention={2: 1.0}, barrier_us={2: 0.0}, collective_us={2: 0.0})
    fast = dataclasses.replace(quiet, **FAST_COPIES)

    def extra(hw, layout):  # the host step over the resident one
        steps = [simulate(Workload(model="opt-125m", batch=1, seq=16, precision=PrecisionConfig(), tier=tier),
                          layout, hw, threads=1) for tier in ("resident", "host")]
        return steps[1].step_s - steps[0].step_s, steps[1]

    block = model_shape("opt-125m").block_params * 4
    copies = model_shape("opt-125m").layers * 2 * block / (quiet.h2d_gbps * 1e9)  # a rank's, each step
    one, _ = extra(quiet, Layout())
    assert one == pytest.approx(extra(fast, Layout())[0], abs=0.05 * copies)
    alone = Layout(pert=2, share_noise=False)  # the resident ranks keep their own masters, as the host ranks do
    two, sim = extra(quiet, alone)
    assert 0.7 * copies < two < 1.2 * copies
    assert abs(extra(fast, alone)[0]) < 0.05 * copies
    ups = [s for s in sim.steady_spans() if s.rank == 0 and s.phase == "upload"]
    assert ups and all(s.bytes == block for s in ups)  # the spans keep the bytes moved


def test_this_engine_computes_counter_based_noise_at_its_own_rate_and_zo2_draws_at_torchs():
    from distzo2_lab.plan.memory import ZO2_REFERENCE

    hw = PROFILES["h100-sxm"]
    slow = dataclasses.replace(hw, noise_gsamples=hw.noise_gsamples / 50)
    w = Workload(model="opt-1.3b", batch=1, seq=256, tier="resident", precision=PrecisionConfig("bf16"))
    fused = lambda h, wl: sum(s.seconds for s in simulate(wl, Layout(), h, steps=3).steady_spans()  # noqa: E731
                              if s.phase in ("update", "perturb", "rng"))
    assert fused(slow, w) > 5 * fused(hw, w)
    zo2 = dataclasses.replace(w, implementation=ZO2_REFERENCE, perturb="in-place")
    assert fused(slow, zo2) == pytest.approx(fused(hw, zo2))  # ZO2 draws with torch's generator
    with pytest.raises(ConfigError, match="noise_gsamples=0"):
        dataclasses.replace(hw, noise_gsamples=0)


def test_a_bf16_master_moves_half_the_bytes_each_way():
    w = Workload(model="opt-125m", batch=1, seq=128, tier="host", precision=PrecisionConfig("bf16", "bf16", "bf16"))
    sim = simulate(w, Layout(), PROFILES["a100-80g-sxm"], steps=3)
    block = model_shape("opt-125m").block_params
    for phase in ("upload", "offload"):
        spans = [s for s in sim.steady_spans() if s.phase == phase]
        assert spans and {s.bytes for s in spans} == {2 * block}, phase


def test_shared_noise_splits_the_draws_without_a_barrier():
    """noise_share.py: the ranks of a node share each whole-bucket draw chunk by chunk (whoever
    claims a chunk first draws it). Ranks arriving together split a piece by whole chunks, so each
    waits for ceil(chunks / size) of them: OPT-125m's 7-chunk blocks cost 4 chunks instead of 7;
    each shared piece adds the measured `share_us`, and no barrier ties the ranks together. A
    tiny block fits one chunk: nothing to split, so the ranks draw alone, as without sharing."""
    # copies share the cores with the draws (test_copies_share_the_cores_with_the_ranks_compute):
    # fast ones here, so that the draws' spans are the draws alone
    hw = _cpu(barrier_us={2: 300.0}, collective_us={2: 300.0}, **FAST_COPIES)
    w = Workload(model="opt-125m", batch=1, seq=16, precision=PrecisionConfig(), tier="host",
                 perturb="in-place")  # z is drawn into memory in place only
    alone = simulate(w, Layout(pert=2, share_noise=False), hw)
    shared = simulate(w, Layout(pert=2, share_noise=True), hw)
    draws = [sum(s.seconds for s in sim.steady_spans() if s.rank == 0 and s.phase == "rng" and s.block >= 0)
             for sim in (alone, shared)]
    assert draws[1] == pytest.approx(4 / 7 * draws[0], rel=0.15)
    assert _busy(shared, 0, "rng") == pytest.approx(_busy(shared, 1, "rng"), rel=0.05)
    costly = simulate(w, Layout(pert=2, share_noise=True), dataclasses.replace(hw, share_us={2: 5000.0}))
    # every shared piece waits 5 ms: at least one per block (12) in the steady steps' draws
    assert _busy(costly, 0, "rng") > _busy(shared, 0, "rng") + 12 * 4e-3
    tiny = dataclasses.replace(w, model="tiny")
    assert simulate(tiny, Layout(pert=2, share_noise=True), hw).step_s == simulate(
        tiny, Layout(pert=2, share_noise=False), hw).step_s


def test_disk_tier_with_several_ranks_commits_on_the_leader_after_a_barrier():
    hw = _cpu(barrier_us={2: 200.0, 4: 400.0}, collective_us={2: 200.0, 4: 400.0}, disk_write_gbps=0.05)
    w = Workload(model="tiny", batch=2, seq=16, precision=PrecisionConfig(), tier="disk")
    for layout in (Layout(pert=2), Layout(dp=2, pert=2, slice=True)):
        sim = simulate(w, layout, hw, steps=3)
        commits = [s for s in sim.spans if s.phase == "commit"]
        assert commits and {s.rank for s in commits} == {0}  # only the leader writes the resident buckets
        assert all(s.lane == "compute" for s in commits)
        host = simulate(dataclasses.replace(w, tier="host"), layout, hw, steps=3)
        assert sim.step_s > host.step_s  # the slow disk commit holds every rank (the next exchange waits)
    # sliced: each rank reads only its shard of the real block from the disk (a quarter of the block,
    # rounded up: the noise regenerates at any start)
    w = dataclasses.replace(w, model="opt-125m", batch=1, seq=8)
    sliced = simulate(w, Layout(dp=2, pert=2, slice=True), hw, steps=2)
    naive = simulate(w, Layout(dp=2, pert=2), hw, steps=2)
    block = model_shape("opt-125m").block_params
    shard = padded_block(model_shape("opt-125m"), 4, True) // 4
    assert shard == -(-block // 4)
    up = {r: max(s.bytes for s in sliced.spans if s.phase == "upload" and s.rank == r) for r in range(4)}
    assert up == {0: shard * 4, 1: shard * 4, 2: shard * 4, 3: (block - 3 * shard) * 4}
    assert {s.bytes for s in naive.spans if s.phase == "upload"} == {block * 4}
    # a tiny block too is cut in four equal shards: every rank uploads and updates a quarter
    tiny = simulate(dataclasses.replace(w, model="tiny"), Layout(dp=2, pert=2, slice=True), hw, steps=3)
    updates = [sum(s.seconds for s in tiny.steady_spans() if s.rank == r and s.phase == "update" and s.block >= 0)
               for r in range(4)]
    assert all(u > 0 for u in updates) and max(updates) < 1.5 * min(updates)
    assert {s.rank for s in tiny.spans if s.phase == "upload" and s.bytes > 0} == {0, 1, 2, 3}


def test_nspsa_pert_4_runs_one_direction_and_sign_per_rank():
    """pert = 2q: q = 2 directions over two PertP pairs, one forward per block per rank; a single
    rank runs all 2q forwards; every rank still applies the q updates (in its one fused pass)."""
    w = dataclasses.replace(zo2_workload("opt-1.3b"), directions=2)
    single = simulate(w, Layout(), A100)
    four = simulate(dataclasses.replace(w, directions=None), Layout(pert=4), A100)
    fwd = {name: sum(1 for s in sim.steady_spans() if s.phase == "forward" and s.rank == 0) / 2
           for name, sim in (("single", single), ("four", four))}
    n = model_shape("opt-1.3b").layers
    assert fwd == {"single": 4 * n, "four": n}
    updates = sum(1 for s in four.steady_spans() if s.phase == "update" and s.rank == 3 and s.block >= 0) / 2
    assert updates == n  # one fused pass per block on every rank: the q = 2 update terms and its copy
    resident = dataclasses.replace(w, tier="resident")  # the host tier is bound by the shared host link
    assert simulate(resident, Layout(pert=4), A100).step_s < 0.5 * simulate(resident, Layout(), A100).step_s
    with pytest.raises(ConfigError, match="m must divide directions"):
        simulate(dataclasses.replace(w, directions=3), Layout(pert=4), A100)


def test_copy_perturbation_spares_a_pertp_rank_the_round_trip():
    """perturb='copy': a PertP rank makes one perturbed copy per block (its own sign) where in place it
    runs the whole +eps / -2 eps / +eps round trip; the plan counts the copy's buffer (in the compute
    dtype) and no noise buffer (the fused pass computes z where it is used)."""
    from distzo2_lab.plan.memory import THIS_ENGINE, memory_plan

    w = dataclasses.replace(zo2_workload("opt-1.3b"), tier="resident", implementation=THIS_ENGINE)
    sims = {mode: simulate(dataclasses.replace(w, perturb=mode), Layout(pert=2), A100) for mode in ("in-place", "copy")}
    def passes(sim, phase):
        return [s for s in sim.steady_spans() if s.phase == phase and s.rank == 0 and s.block >= 0]

    n = model_shape("opt-1.3b").layers
    # in place: three perturb passes per block; copies: one fused pass (the update and the copy)
    assert len(passes(sims["in-place"], "perturb")) == 3 * len(passes(sims["copy"], "update")) == 3 * 2 * n
    assert not passes(sims["copy"], "perturb") and not passes(sims["copy"], "rng")
    assert sims["copy"].step_s < sims["in-place"].step_s
    plans = {mode: memory_plan(dataclasses.replace(w, perturb=mode), Layout(pert=2), A100).device
             for mode in ("in-place", "copy")}
    assert "perturbed copies" in plans["copy"] and "perturbed copies" not in plans["in-place"]
    assert plans["copy"]["perturbed copies"] == model_shape("opt-1.3b").block_params * 2  # fp16, one sign
    assert "noise" in plans["in-place"] and "noise" not in plans["copy"]
    with pytest.raises(ConfigError, match="perturb='both' is not valid; choose one of auto, in-place, copy"):
        simulate(dataclasses.replace(w, perturb="both"), Layout(), A100)
    with pytest.raises(ConfigError, match="perturb='in-place' with 2 directions"):
        simulate(dataclasses.replace(w, perturb="in-place", directions=2), Layout(), A100)


def test_copy_share_splits_the_block_copies_of_ranks_with_the_same_signs():
    """zo.perturb copy (copy_share.CopyShare): in 2D the two ranks of each sign make each block's
    copy once between them (OPT-125m: the longest run is 4 of 7 chunks); PertP ranks run different
    signs and copy alone; DDP ranks run both signs, whose copies one fused pass makes with z
    computed once for the two, so they share nothing."""
    from distzo2_lab.plan.simulator import copy_groups_of

    hw = _cpu(barrier_us={2: 300.0, 4: 300.0}, collective_us={2: 300.0, 4: 300.0})
    block = 7 << 20  # OPT-125m's block: 7 chunks
    assert copy_groups_of(Layout(dp=2), hw, 1, block) == {}  # both signs per rank
    assert copy_groups_of(Layout(pert=2), hw, 1, block) == {}
    two_d = Layout(dp=2, pert=2)
    groups = copy_groups_of(two_d, hw, 1, block)
    assert len(groups) == 4 and all(len(m) == 2 and len({two_d.signs(x) for x in m}) == 1 for m in groups.values())
    assert copy_groups_of(two_d, hw, 1, 49984) == {}  # a tiny block fits one chunk: nothing to split
    assert copy_groups_of(Layout(dp=2, pert=2, share_noise=False), hw, 1, block) == {}
    # over a host store each rank uploads its own block (on the resident tier the node's one master
    # makes every copy: test_the_node_s_one_master_makes_each_update_and_copy_once)
    w = Workload(model="opt-125m", batch=1, seq=16, precision=PrecisionConfig(), tier="host", perturb="copy")
    shared = simulate(w, two_d, hw)
    alone = simulate(w, dataclasses.replace(two_d, share_noise=False), hw)
    # alone: one fused pass (update and copy); shared: the update alone, then 4 of 7 chunks of the copy
    assert _busy(alone, 0, "perturb") == 0 and _busy(shared, 0, "perturb") > 0
    assert _busy(shared, 0, "update") + _busy(shared, 0, "perturb") < _busy(alone, 0, "update")


def test_the_node_s_one_master_makes_each_update_and_copy_once():
    """Resident tier with copies (master_share.MasterShare): every rank of the node (same directions)
    holds one master; each bucket's fused pass, update and both signs' copies, is a piece whose
    chunks the node's ranks split, so a rank computes a fraction of what it computes alone, in every
    layout. Not for streamed tiers, the method family, or n-SPSA ranks running different directions."""
    from distzo2_lab.plan.simulator import master_groups_of

    hw = _cpu(barrier_us={2: 300.0, 4: 300.0}, collective_us={2: 300.0, 4: 300.0})
    block = 7 << 20
    for layout in (Layout(dp=2), Layout(pert=2), Layout(dp=2, pert=2)):
        groups = master_groups_of(layout, hw, 1, block)
        assert groups == {r: tuple(range(layout.world_size)) for r in range(layout.world_size)}
        assert master_groups_of(dataclasses.replace(layout, share_noise=False), hw, 1, block) == {}
    assert master_groups_of(Layout(pert=4), hw, 2, block) == {}  # two direction pairs: different z
    w = Workload(model="opt-125m", batch=1, seq=16, precision=PrecisionConfig(), tier="resident", perturb="copy")
    for layout in (Layout(dp=2), Layout(dp=2, pert=2)):
        shared, alone = simulate(w, layout, hw), simulate(w, dataclasses.replace(layout, share_noise=False), hw)
        work = [_busy(sim, 0, "update") + _busy(sim, 0, "perturb") for sim in (shared, alone)]
        assert work[0] < 0.75 * work[1]
        host = dataclasses.replace(w, tier="host")
        assert simulate(host, layout, hw).step_s != shared.step_s
