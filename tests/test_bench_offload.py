"""Offload benchmarks on tiny-deep: the result shapes and invariants, never the timings."""
import math
import os

from distzo2_lab.bench.offload import (
    format_memory,
    format_overhead,
    format_ratios,
    offload_ratios,
    peak_memory_subprocess,
    recording_overhead,
)
from distzo2_lab.config import OFFLOAD_TIERS
from distzo2_lab.models import build_model, count_parameters
from distzo2_lab.models.opt import OPTAdapter

SHAPE = dict(model="tiny-deep", batch=2, seq=12, threads=1)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_offload_ratios_compares_three_tiers_with_identical_losses(tmp_path):
    r = offload_ratios(**SHAPE, steps=2, prefetch=1, store_dir=str(tmp_path))
    for key in ("resident_step_s", "host_step_s", "disk_step_s", "host_ratio", "disk_ratio", "identical",
                "disk_read_bytes_per_step", "disk_written_bytes_per_step", "disk_read_gbps", "disk_kept_up", "tiers"):
        assert key in r
    assert r["identical"] is True
    assert _positive(r["host_ratio"]) and _positive(r["disk_ratio"])
    assert set(r["tiers"]) == set(OFFLOAD_TIERS)
    for tier in OFFLOAD_TIERS:
        t = r["tiers"][tier]
        assert len(t["step_times"]) == 2 and len(t["losses"]) == 2
        assert "compute" in t["overlap"]["busy"]
    assert "upload" in r["tiers"]["disk"]["overlap"]["busy"] and isinstance(r["disk_kept_up"], bool)
    # every timed step reads each block once and writes each block and both resident buckets once
    a = OPTAdapter(build_model("tiny-deep"))
    blocks = sum(b.numel for b in a.blocks) * 4
    assert r["disk_read_bytes_per_step"] == blocks
    assert r["disk_written_bytes_per_step"] == blocks + (a.bucket_in.numel + a.bucket_out.numel) * 4
    assert os.listdir(tmp_path) == []  # the temporary store is gone
    assert "identical across tiers: True" in format_ratios(r)


def test_recording_overhead_is_a_finite_fraction():
    r = recording_overhead(**SHAPE, steps=2, tier="host")
    assert math.isfinite(r["overhead_fraction"]) and r["overhead_fraction"] > -1
    assert _positive(r["off_step_s"]) and _positive(r["on_step_s"])
    assert len(r["off_times"]) == len(r["on_times"]) == 2
    assert r["spans_per_step"] > 0  # the "on" steps did record
    assert "overhead" in format_overhead(r)


def test_peak_memory_runs_in_a_fresh_process(tmp_path):
    r = peak_memory_subprocess("tiny-deep", tier="disk", steps=1, batch=2, seq=12, prefetch=0,
                               store_dir=str(tmp_path), threads=1, timeout=300)
    for key in ("peak_rss_kib", "ru_maxrss_kib", "baseline_rss_kib", "rss_model_ratio", "model_bytes",
                "store_build_s", "step_s", "disk_read_bytes_per_step", "disk_read_gbps", "disk_write_gbps"):
        assert key in r
    assert r["model_bytes"] == 4 * count_parameters("tiny-deep")
    assert r["peak_rss_kib"] >= r["baseline_rss_kib"] > 0
    assert _positive(r["rss_model_ratio"]) and r["disk_read_bytes_per_step"] > 0 and r["store_bytes"] > 0
    assert os.listdir(tmp_path) == []
    assert "of the model" in format_memory(r)
