"""The device benchmark on CPU (where CI runs it): cases, invariants, the planner beside them; never timings.
On a GPU the same module reads peak device memory (benchmarks/gpu_check.sh)."""
import pytest

from distzo2_lab.bench.device import device_cases, format_cases
from distzo2_lab.config import ConfigError, PrecisionConfig
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan.hardware import get_hardware
from distzo2_lab.plan.memory import THIS_ENGINE, Workload, memory_plan


def test_mezo_and_every_zo2_tier_give_the_same_losses_and_carry_the_plan(tmp_path):
    r = device_cases("tiny-deep", batch=2, seq=12, steps=2, compute="fp32", device="cpu", threads=1,
                     tiers=("host", "disk"), store_dir=str(tmp_path))
    cases = [(c["engine"], c["tier"]) for c in r["cases"]]
    assert cases == [("eager", "resident"), ("zo2", "resident"), ("zo2", "host"), ("zo2", "disk")]
    assert all(c["same_losses_as_mezo"] for c in r["cases"])
    assert r["links_gbps"] is None and all(c["peak_bytes"] is None for c in r["cases"])  # no device memory on CPU
    w = Workload(model="tiny-deep", batch=2, seq=12, precision=PrecisionConfig("fp32"), tier="host", prefetch=1,
                 implementation=THIS_ENGINE)
    mp = memory_plan(w, Layout(), get_hardware("h100-sxm"))
    host = r["cases"][2]
    assert host["planned_bytes"] == pytest.approx(mp.device_total - mp.device["runtime overhead"])
    assert set(host["predicted_s"]) == {"h100-sxm"}  # the links are measured on CUDA only
    assert host["ratio"]["h100-sxm"] == pytest.approx(host["predicted_s"]["h100-sxm"] / host["step_s"])
    assert r["cases"][0]["phases_s"] == {}  # eager MeZO records no spans
    for c in r["cases"][1:]:
        assert c["phases_s"]["compute:forward"] > 0
    for c in r["cases"][2:]:
        assert c["phases_s"]["upload:upload"] > 0 and c["upload_gbps"] > 0
    text = format_cases(r)
    assert "zo2 disk" in text and "ms per step by phase" in text and "no spans (eager MeZO)" in text


def test_the_bf16_master_case_moves_half_the_bytes_of_the_host_tier():
    r = device_cases("tiny-deep", batch=2, seq=12, steps=2, compute="bf16", device="cpu", threads=1,
                     tiers=("host", "host-bf16"))
    host, half = r["cases"][2], r["cases"][3]
    assert (host["tier"], half["tier"]) == ("host", "host-bf16")
    assert half["bytes_per_param_per_step"] == pytest.approx(host["bytes_per_param_per_step"] / 2)
    assert half["planned_bytes"] < host["planned_bytes"]  # no working copy beside a bf16 master
    with pytest.raises(ConfigError, match="host-bf16 holds bf16 masters"):
        device_cases("tiny", device="cpu", compute="fp32", tiers=("host-bf16",))


def test_bad_tiers_and_a_missing_gpu_are_one_clear_error():
    with pytest.raises(ConfigError, match="tiers=.*host, host-bf16, disk"):
        device_cases("tiny", device="cpu", tiers=("resident",))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda'.*no CUDA device"):
            device_cases("tiny", device="cuda")
