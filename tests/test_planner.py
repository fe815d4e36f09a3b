"""The memory planner, the hardware profiles, calibration and `distzo2 plan`."""
from __future__ import annotations

import dataclasses
import json

import pytest

from distzo2_lab.cli.main import main
from distzo2_lab.config import ConfigError, PrecisionConfig
from distzo2_lab.models import count_parameters
from distzo2_lab.parallel.layout import Layout
from distzo2_lab.plan import PROFILES, get_hardware, memory_plan, model_shape, nearest_fit
from distzo2_lab.plan.hardware import calibration_path, load_profile
from distzo2_lab.plan.memory import GB, THIS_ENGINE, ZO2_REFERENCE, Workload, adam_bytes, mezo_bytes
from distzo2_lab.plan.paper import ZO2_PEAK_GB, zo2_memory_check, zo2_workload

A100 = PROFILES["a100-80g-sxm"]


@pytest.mark.parametrize("model", ["tiny", "opt-125m", "opt-350m"])
def test_shape_counts_equal_the_meta_model(model):
    assert model_shape(model).total == count_parameters(model)


def test_opt_175b_has_175b_parameters():
    s = model_shape("opt-175b")
    assert s.layers == 96 and s.hidden == 12288
    assert 174e9 < s.total < 176e9, s.total


def test_zo2_published_peak_memory_within_10_percent_for_every_size():
    rows = zo2_memory_check()
    assert [r["model"] for r in rows] == list(ZO2_PEAK_GB)
    bad = [(r["model"], round(r["error"], 3)) for r in rows if abs(r["error"]) > 0.10]
    assert not bad, bad


def test_memory_components_follow_the_settings_not_the_size():
    """Each component is derived: one more prefetched block adds exactly one block of fp16; PertP keeps one
    hidden state instead of two; slicing adds one shard of send buffer; the overhead is one constant."""
    w = zo2_workload("opt-13b")
    base = memory_plan(w, Layout(), A100).device
    more = memory_plan(dataclasses.replace(w, prefetch=2), Layout(), A100).device
    block = model_shape("opt-13b").block_params
    assert more["blocks in flight"] - base["blocks in flight"] == block * 2
    pertp = memory_plan(w, Layout(1, 2), A100).device
    assert pertp["activations: hidden states"] * 2 == base["activations: hidden states"]
    sliced = memory_plan(w, Layout(1, 2, slice=True), A100).device
    assert 0 < sliced["all-gather buffers"] <= (block // 2 + (1 << 20)) * 2
    overheads = {memory_plan(zo2_workload(m), Layout(), A100).device["runtime overhead"] for m in ZO2_PEAK_GB}
    assert overheads == {A100.context_gb * GB}
    # without the overhead the small models miss their published peaks by far more than 10 %
    r = zo2_memory_check(dataclasses.replace(A100, context_gb=0.0))
    assert r[0]["error"] < -0.4


def test_this_engine_keeps_fp32_masters_on_the_wire():
    w = Workload(model="opt-1.3b", tier="host", implementation=THIS_ENGINE)
    ours = memory_plan(w, Layout(), A100)
    zo2 = memory_plan(dataclasses.replace(w, implementation=ZO2_REFERENCE), Layout(), A100)
    assert ours.host["blocks (one shared copy)"] == 2 * zo2.host["blocks (one shared copy)"]
    assert ours.device_total > zo2.device_total


def test_a_bf16_master_halves_the_host_copy_and_the_bytes_on_the_wire():
    bf16 = PrecisionConfig("bf16", "bf16", "bf16")
    w32 = Workload(model="opt-1.3b", tier="host", precision=PrecisionConfig("bf16", "bf16", "fp32"))
    w16 = dataclasses.replace(w32, precision=bf16)
    p32, p16 = memory_plan(w32, Layout(), A100), memory_plan(w16, Layout(), A100)
    assert p16.host["blocks (one shared copy)"] * 2 == p32.host["blocks (one shared copy)"]
    shape = model_shape("opt-1.3b")
    # the working copy beside the fp32 master is gone too: the bf16 master is what the forward reads
    assert p32.device["resident modules"] - p16.device["resident modules"] == shape.resident * 4
    with pytest.raises(ConfigError, match="tier='disk' keeps fp32 slots"):
        memory_plan(dataclasses.replace(w16, tier="disk"), Layout(), A100)


def test_opt_175b_arithmetic_adam_and_mezo_do_not_fit_zo2_does():
    w = zo2_workload("opt-175b")
    assert adam_bytes(w, A100) / GB > 2500  # 16 bytes per parameter
    assert mezo_bytes(w, A100) / GB > 340  # fp16 weights alone are 350 GB
    assert memory_plan(w, Layout(), A100).fits
    assert mezo_bytes(zo2_workload("opt-1.3b"), A100) < A100.device_memory_gb * GB


def test_disk_tier_moves_the_blocks_out_of_host_memory():
    w = Workload(model="opt-66b", tier="disk")
    mp = memory_plan(w, Layout(), PROFILES["rtx4090"])
    assert mp.host_total < 10 * GB and mp.disk_total > 2 * 4 * 60e9


def test_unknown_hardware_names_the_choices():
    with pytest.raises(ConfigError, match="a100-80g-sxm, h100-sxm, rtx4090, this-machine"):
        get_hardware("tpu-v9")


def test_this_machine_before_calibration_says_how(tmp_path):
    with pytest.raises(ConfigError, match="distzo2 plan calibrate"):
        get_hardware("this-machine", str(tmp_path))


def test_nearest_layout_that_fits_fits():
    hw = PROFILES["rtx4090"]
    w = Workload(model="opt-66b", tier="host", prefetch=1)
    assert not memory_plan(w, Layout(), hw).fits
    near_w, near_layout, mp = nearest_fit(w, Layout(), hw, gpus=1)
    assert mp.fits and memory_plan(near_w, near_layout, hw).fits
    assert near_layout.world_size == 1


def test_cli_plan_prints_memory_speed_and_bottleneck(capsys):
    rc = main(["plan", "--model", "opt-175b", "--gpus", "8", "--hardware", "a100-80g-sxm", "--layout", "dp=4,pert=2",
               "--slice", "--steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("memory per device", "host memory per node", "step time", "tokens/s", "bottleneck",
                 "speed-up over single-device ZO2", "MeZO does not fit"):
        assert text in out, out


def test_cli_plan_json_and_mezo_speedup_where_it_fits(capsys):
    rc = main(["plan", "--model", "opt-1.3b", "--gpus", "2", "--layout", "dp=2,pert=1", "--steps", "2", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert rc == 0 and p["layout"] == {"dp": 2, "pert": 1, "slice": False}
    assert p["speedup_vs_mezo"] is not None and p["speedup_vs_zo2"] > 1.0
    assert p["bottleneck"] in ("upload", "compute", "offload", "exchange")


@pytest.mark.parametrize("argv, message", [
    (["--hardware", "tpu-v9"], "hardware='tpu-v9' is not known"),
    (["--gpus", "8", "--layout", "dp=2,pert=2"], "for 8 devices choose one of dp=8,pert=1, dp=4,pert=2"),
    (["--model", "opt-66b", "--hardware", "rtx4090"], "nearest layout that fits: dp=1,pert=1 (disk tier"),
    (["--model", "opt-9b"], "model='opt-9b' is not a preset"),
    (["--implementation", "deepspeed"], "implementation='deepspeed' is not valid"),
])
def test_cli_plan_errors_are_one_clear_sentence(argv, message, capsys):
    assert main(["plan", "--steps", "2", *argv]) == 2
    assert message in capsys.readouterr().err


def test_calibrate_writes_this_machine_and_plan_reads_it(tmp_path, capsys):
    rc = main(["plan", "calibrate", "--dir", str(tmp_path), "--no-collectives"])
    assert rc == 0 and "calibrated this machine" in capsys.readouterr().out
    hw = load_profile(calibration_path(str(tmp_path)))
    assert hw.kind == "cpu" and hw.cores >= 1
    for value in (hw.tflops("fp32"), hw.rng_gsamples, hw.memory_gbps, hw.h2d_gbps, hw.disk_read_gbps, hw.launch_us):
        assert value > 0
    rc = main(["plan", "--model", "tiny", "--hardware", "this-machine", "--dir", str(tmp_path), "--batch", "8",
               "--seq", "32", "--precision", "fp32", "--storage", "fp32", "--steps", "2"])
    assert rc == 0 and "this-machine" in capsys.readouterr().out


def test_device_calibration_measures_a_gpu_profile_the_planner_reads(tmp_path, capsys):
    """`plan calibrate --device cuda`'s probes (on a GPU in tests/test_gpu.py; here on the CPU, their
    device-agnostic path): a 'gpu' profile with every rate measured, that the simulator plans with."""
    from distzo2_lab.bench.calibrate_gpu import calibrate_device

    hw = calibrate_device(str(tmp_path), device="cpu", compute="fp32")
    assert hw.kind == "gpu" and set(hw.rate_by_width) == {768, 2048}
    for value in (*hw.rate_by_width.values(), hw.rng_gsamples, hw.memory_gbps, hw.launch_us, hw.call_us,
                  hw.embed_us, hw.head_us, hw.disk_read_gbps):
        assert value > 0
    saved = load_profile(calibration_path(str(tmp_path)))
    assert (saved.kind, saved.launch_us, saved.rng_gsamples) == ("gpu", hw.launch_us, hw.rng_gsamples)
    rc = main(["plan", "--model", "opt-125m", "--hardware", "this-machine", "--dir", str(tmp_path), "--tier",
               "resident", "--seq", "256", "--precision", "fp32", "--storage", "fp32", "--steps", "2"])
    assert rc == 0 and "this-machine" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="device='tpu' is not valid; choose cuda or cpu"):
        calibrate_device(str(tmp_path), device="tpu")


def test_a_profile_with_a_rate_of_zero_is_refused_by_name():
    """A zero bandwidth would leave the simulator's transfers unfinished: refused where it is made."""
    from distzo2_lab.plan.hardware import with_overrides

    with pytest.raises(ConfigError, match=r"h2d_gbps=0.0 is not valid; it must be a positive number"):
        with_overrides(A100, h2d_gbps=0.0)
    with pytest.raises(ConfigError, match=r"peer_gbps=0 is not valid.*or None: not limiting"):
        with_overrides(A100, peer_gbps=0)
    assert with_overrides(A100, peer_gbps=None).peer_gbps is None


def test_precision_is_validated():
    with pytest.raises(ConfigError, match="precision.storage"):
        memory_plan(Workload(precision=PrecisionConfig("fp32", "fp16", "none")), Layout(), A100)


def test_nspsa_layouts_are_planned(capsys):
    """pert = 4 runs q = 2 directions (one per PertP pair): the plan counts the perturbed copies and one
    hidden state per rank; pert = 4 with 3 directions is refused with the valid choice."""
    rc = main(["plan", "--model", "opt-13b", "--gpus", "4", "--layout", "dp=1,pert=4", "--steps", "2", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert rc == 0 and p["layout"]["pert"] == 4 and p["directions"] == 2
    assert p["memory_per_device_gb"]["perturbed copies"] * GB == model_shape("opt-13b").block_params * 2  # one sign
    w = zo2_workload("opt-13b")
    w = dataclasses.replace(w, implementation=THIS_ENGINE)
    one = memory_plan(dataclasses.replace(w, directions=2), Layout(), A100).device
    four = memory_plan(w, Layout(pert=4), A100).device
    assert one["activations: hidden states"] == 4 * four["activations: hidden states"]  # 2 directions x 2 signs
    assert main(["plan", "--steps", "2", "--layout", "dp=1,pert=4", "--gpus", "4", "--directions", "3"]) == 2
    assert "choose directions as a multiple of 2" in capsys.readouterr().err


def test_perturb_flag_plans_the_copy(capsys):
    args = ["plan", "--model", "opt-13b", "--gpus", "2", "--layout", "dp=1,pert=2", "--steps", "2"]
    assert main([*args, "--json", "--perturb", "in-place"]) == 0
    in_place = json.loads(capsys.readouterr().out)
    assert main([*args, "--json"]) == 0  # auto: the copies
    copy = json.loads(capsys.readouterr().out)
    assert (in_place["perturb"], copy["perturb"]) == ("in-place", "copy")
    mem = copy["memory_per_device_gb"], in_place["memory_per_device_gb"]
    assert "perturbed copies" in mem[0] and "perturbed copies" not in mem[1]
    assert copy["step_s"] < in_place["step_s"]  # one pass per block instead of the round trip's three
    assert main([*args, "--perturb", "copy"]) == 0 and "(perturbed copies)" in capsys.readouterr().out
    assert main([*args, "--perturb", "twice"]) == 2
    assert "perturb='twice' is not valid; choose one of auto, in-place, copy" in capsys.readouterr().err


def test_optimizer_state_joins_device_host_and_disk_memory():
    hw, one = get_hardware("a100-80g-sxm"), Layout(1, 1)
    for tier, where in (("resident", "device"), ("host", "host"), ("disk", "disk")):
        base = Workload(model="opt-1.3b", tier=tier)
        sgd = memory_plan(base, one, hw)
        adam = memory_plan(dataclasses.replace(base, optimizer="adam"), one, hw)
        mom = memory_plan(dataclasses.replace(base, optimizer="momentum"), one, hw)
        extra = getattr(adam, f"{where}_total") - getattr(sgd, f"{where}_total")
        shape = model_shape("opt-1.3b")
        blocks = shape.layers * shape.block_params
        assert extra >= 8 * blocks  # two fp32 moments of every streamed or resident block
        assert getattr(mom, f"{where}_total") - getattr(sgd, f"{where}_total") == pytest.approx(extra / 2)
        assert adam.device_total > sgd.device_total  # the resident modules' state at least


def test_simulator_counts_each_method_extra_forwards(capsys):
    def forwards(*flags):
        assert main(["plan", "--model", "opt-125m", "--gpus", "1", "--layout", "dp=1,pert=1", "--tier", "resident",
                     "--steps", "2", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["step_s"]

    sgd, hizoo, cons = forwards(), forwards("--optimizer", "hizoo"), forwards("--optimizer", "conservative")
    one_sided = forwards("--estimator", "one-sided", "--directions", "4")
    four = forwards("--directions", "4")
    assert sgd < hizoo < cons  # 2, 3 and 4 forwards
    assert one_sided < four  # 5 forwards against n-SPSA's 8


def test_simulator_plans_the_family_on_pertp(capsys):
    def step_s(pert, *flags):
        assert main(["plan", "--model", "opt-125m", "--gpus", str(pert), "--layout", f"dp=1,pert={pert}", "--tier",
                     "resident", "--steps", "2", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["step_s"]

    # PertP deals the step's passes out over the pert group: hizoo's 3 forwards take 2 on the busier rank
    assert step_s(2, "--optimizer", "hizoo") < step_s(1, "--optimizer", "hizoo")
    assert step_s(2, "--optimizer", "hizoo") > step_s(2)
    one_sided = ["--estimator", "one-sided", "--directions", "4"]  # 5 forwards: 3 on the busier of 2 ranks
    assert step_s(2, *one_sided) < step_s(1, *one_sided)


def test_plan_refuses_an_unknown_optimizer(capsys):
    assert main(["plan", "--steps", "2", "--optimizer", "lion"]) == 2
    assert "optimizer='lion' is not valid" in capsys.readouterr().err
