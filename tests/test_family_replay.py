"""A run of the method family rebuilds from its base and seed log bit for bit: each record carries
the method scalars a replay needs (Adam's t, HiZOO's curvature, ZO-SGD-Cons's accept flag), and
the replay runs the reference's own update with the state and schedules evolving as in training."""
import dataclasses
import json

import pytest

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig
from distzo2_lab.run.checkpoint import digest
from distzo2_lab.run.train import rebuild, train

BASE = TrainConfig(steps=5, batch_size=2, seq_len=8, threads=1)
RUNS = {
    "adam": ZOConfig(optimizer="adam", lr=1e-3, weight_decay=0.05),
    "hizoo-sparse": ZOConfig(optimizer="hizoo", perturbation="sparse:0.5", sparse_refresh=2, lr=1e-3),
    "conservative": ZOConfig(optimizer="conservative", lr=1e-3),  # the first step is rejected, the rest kept
    "momentum-lowrank-one-sided": ZOConfig(optimizer="momentum", perturbation="lowrank:2", lowrank_interval=2,
                                           estimator="one-sided", directions=3, lr=1e-6),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_family_run_rebuilds_from_its_seed_log(name, tmp_path):
    s = train(dataclasses.replace(BASE, zo=RUNS[name]), out=str(tmp_path / "out"), progress=False)
    log = tmp_path / "out" / "seedlog.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert all(r["method"]["t"] == r["step"] + 1 for r in records)
    if name == "conservative":
        assert {r["method"]["accept"] for r in records} == {True, False}  # both kinds replayed
    if name.startswith("hizoo"):
        assert all(r["method"]["curvature"] >= 0 for r in records)
    assert digest(rebuild(str(log))) == s["digest"]


def test_the_host_tier_run_rebuilds_too(tmp_path):
    cfg = dataclasses.replace(BASE, zo=RUNS["adam"], offload=OffloadConfig(tier="host"))
    s = train(cfg, out=str(tmp_path / "out"), progress=False)
    assert digest(rebuild(str(tmp_path / "out" / "seedlog.jsonl"))) == s["digest"]


def test_a_family_log_without_method_records_is_refused(tmp_path):
    train(dataclasses.replace(BASE, steps=2, zo=RUNS["adam"]), out=str(tmp_path / "out"), progress=False)
    log = tmp_path / "out" / "seedlog.jsonl"
    lines = log.read_text().splitlines()
    stripped = [lines[0]] + [json.dumps({k: v for k, v in json.loads(x).items() if k != "method"}) for x in lines[1:]]
    log.write_text("\n".join(stripped) + "\n")
    with pytest.raises((ConfigError, ValueError), match="no method record"):
        rebuild(str(log))
