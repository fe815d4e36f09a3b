"""n-SPSA (q directions, out-of-place), out-of-place copies for one direction (zo.perturb) and
gradient accumulation (micro-batches), single rank.

The eager reference implements both rules plainly; the block engine (resident and streamed) must
equal it bit for bit. Accumulation equals the whole-batch step up to the order of the float sums.
"""
import dataclasses
import math

import pytest
import torch

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.models import OPTAdapter, build_model
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.reference import EagerMeZO
from distzo2_lab.zo.spsa import PendingUpdate, count_tokens, direction_seed, split_micro, weighted_loss
from tests.helpers import batches, masters_equal, run

ZO = ZOConfig(weight_decay=0.1)


def pair(zo, micro=1):
    a = OPTAdapter(build_model("tiny", seed=7))
    b = OPTAdapter(build_model("tiny", seed=7))
    return EagerMeZO(a, zo, micro_batches=micro), ZO2Engine(b, zo, micro_batches=micro)


@pytest.mark.parametrize("q,micro", [(2, 1), (3, 1), (1, 2), (2, 3)])
def test_engine_equals_eager_reference(q, micro):
    zo = ZOConfig(weight_decay=0.1, directions=q)
    eager, engine = pair(zo, micro)
    bs = batches(4, batch=6)
    ref, got = run(eager, bs), run(engine, bs)
    engine.flush()
    assert [r.to_dict() for r in ref] == [r.to_dict() for r in got]
    assert masters_equal(eager.adapter, engine.adapter)
    if q > 1:
        assert len(got[0].terms) == q and got[0].terms[0][0] != got[0].terms[1][0]
        assert math.isclose(got[0].grad, sum(g for _, g in got[0].terms) / q)


@pytest.mark.parametrize("micro", [1, 2])
def test_copies_equal_the_eager_reference(micro):
    """zo.perturb='copy' with one direction: theta +- eps z out of place, bit-exact with the reference
    running the same rule; the first step's l+ equals the in-place one (the same theta + eps z), its
    l- differs only by the round trip's rounding ((theta + eps z) - 2 eps z against theta - eps z)."""
    zo = ZOConfig(weight_decay=0.1, perturb="copy")
    eager, engine = pair(zo, micro)
    bs = batches(4, batch=6)
    ref, got = run(eager, bs), run(engine, bs)
    engine.flush()
    assert [r.to_dict() for r in ref] == [r.to_dict() for r in got] and got[0].terms == ()
    assert masters_equal(eager.adapter, engine.adapter)
    in_place = run(pair(ZOConfig(weight_decay=0.1), micro)[0], bs)
    assert in_place[0].loss_plus == got[0].loss_plus
    assert max(abs(a.loss_minus - b.loss_minus) for a, b in zip(in_place, got)) < 1e-5
    assert max(abs(a.loss_plus - b.loss_plus) for a, b in zip(in_place, got)) < 1e-5


def test_copies_stream_through_the_host_tier():
    from distzo2_lab.run.train import train

    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, zo=ZOConfig(perturb="copy"))
    resident = train(cfg, progress=False)
    host = train(validate(dataclasses.replace(cfg, offload=OffloadConfig(tier="host"))), progress=False)
    eager = train(dataclasses.replace(cfg, engine="eager"), progress=False)
    assert resident["steps"] == host["steps"] == eager["steps"]
    assert resident["digest"] == host["digest"] == eager["digest"]


def test_nspsa_update_is_the_mean_of_the_directions():
    """theta_1 = theta_0 - lr/q sum_j g_j z_j - lr wd theta_0, computed here by hand."""
    q, zo = 2, ZOConfig(weight_decay=0.1, directions=2)
    eager, _ = pair(zo)
    before = [b.master.clone() for b in eager.adapter.buckets]
    r = eager.step(batches(1)[0], 123)
    for b, theta in zip(eager.adapter.buckets, before):
        expect = theta.clone()
        for a_, e_ in b.decay_spans:
            expect[a_:e_] -= zo.lr * zo.weight_decay * theta[a_:e_]
        for s, g in r.terms:
            z = torch.empty(b.numel)
            eager.perturber.fill(z, s, b.key)
            expect -= zo.lr / q * g * z
        torch.testing.assert_close(b.master, expect, rtol=0, atol=1e-6)


def test_nspsa_never_perturbs_the_master():
    """Out of place: with a negligible lr the masters move by ~lr only; MeZO's in-place round
    trip (+eps, -2 eps, +eps) leaves rounding errors many orders larger."""
    drift = {}
    for q, mode in ((1, "in-place"), (2, "auto"), ("copy", "auto")):
        _, engine = pair(ZOConfig(lr=1e-30, directions=1 if q == "copy" else q, perturb=mode))
        start = [b.master.clone() for b in engine.adapter.buckets]
        engine.step(batches(1)[0], 5)
        engine.flush()
        drift[q] = max(float((b.master - s).abs().max()) for b, s in zip(engine.adapter.buckets, start))
    assert max(drift[2], drift["copy"]) < 1e-20 < 1e-12 < drift[1], drift


def test_direction_seeds_and_update_records():
    """Direction 0's seed is the step seed; a pending update lists (seed, g, lr, wd) per direction."""
    assert direction_seed(77, 0) == 77 and direction_seed(77, 1) != 77
    assert PendingUpdate(0, 1, 0.5, 0.1).updates(0.2) == [(1, 0.5, 0.1, 0.2)]


def test_accumulation_matches_the_whole_batch_loss():
    eager1, engine4 = pair(ZO, 1)[0], pair(ZO, 4)[1]
    bs = batches(3, batch=8)
    one, four = run(eager1, bs), run(engine4, bs)
    for a, b in zip(one, four):
        assert a.tokens == b.tokens
        assert math.isclose(a.loss_plus, b.loss_plus, rel_tol=1e-5)
        assert math.isclose(a.grad, b.grad, rel_tol=1e-2, abs_tol=1e-3)
    # and the rule itself: the token-weighted mean of the micro losses
    micro = split_micro(bs[0], 4)
    assert len(micro) == 4 and micro[0][0].shape == (2, 12)
    assert weighted_loss([1.0, 3.0], [1, 3]) == 2.5 and weighted_loss([None], [1]) is None
    assert count_tokens(micro[0][1]) == 2 * 11


def test_streamed_tiers_run_both_rules():
    from distzo2_lab.run.train import train

    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, micro_batches=2,
                      zo=ZOConfig(directions=2))
    resident = train(cfg, progress=False)
    host = train(validate(TrainConfig(**{**cfg.__dict__, "offload": OffloadConfig(tier="host")})), progress=False)
    assert resident["steps"] == host["steps"] and resident["digest"] == host["digest"]


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="micro_batches=3 does not divide batch_size=8; choose one of 1, 2, 4, 8"):
        validate(TrainConfig(batch_size=8, micro_batches=3))
    with pytest.raises(ConfigError, match="zo.directions=0 is not valid"):
        validate(TrainConfig(zo=ZOConfig(directions=0)))
    with pytest.raises(ConfigError, match="offload.lean=True runs MeZO's in-place step"):
        validate(TrainConfig(zo=ZOConfig(directions=2), offload=OffloadConfig(tier="disk", store="/tmp/x", lean=True)))
    with pytest.raises(ConfigError, match="zo.perturb='copy' perturbs out of place"):
        lean = OffloadConfig(tier="disk", store="/tmp/x", lean=True)
        validate(TrainConfig(zo=ZOConfig(perturb="copy"), offload=lean))
    with pytest.raises(ConfigError, match="zo.perturb='in-place' with zo.directions=2: n-SPSA perturbs out of place"):
        validate(TrainConfig(zo=ZOConfig(directions=2, perturb="in-place")))


def test_nspsa_seed_log_rebuilds_the_weights(tmp_path):
    """Every direction's (seed, g) is logged; replay applies the updates only (no round trip)."""
    import json

    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild, train

    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, zo=ZOConfig(directions=2))
    s = train(cfg, out=str(tmp_path), progress=False)
    records = [json.loads(x) for x in open(tmp_path / "seedlog.jsonl")][1:]
    assert len(records[0]["terms"]) == 2
    assert digest(rebuild(str(tmp_path / "seedlog.jsonl"))) == s["digest"]


def test_nspsa_disk_store_resumes_with_every_direction(tmp_path):
    """The pending update rebuilt from the store's seed log carries every direction's (seed, g)."""
    import dataclasses

    from distzo2_lab.run.train import train

    cfg = TrainConfig(steps=4, batch_size=4, seq_len=12, threads=1, zo=ZOConfig(directions=2))
    ref = train(cfg, progress=False)
    disk = dataclasses.replace(cfg, offload=OffloadConfig(tier="disk", store=str(tmp_path / "store")))
    first = train(dataclasses.replace(disk, steps=2), progress=False)
    rest = train(disk, progress=False)
    assert rest["start_step"] == 2 and first["steps"] + rest["steps"] == ref["steps"]
    assert rest["digest"] == ref["digest"]
