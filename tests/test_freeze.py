"""zo.freeze: parameters held fixed (z = 0 on them), equal in the eager reference, the block engine
(resident, streamed, distributed) and the seed-log replay; copies (zo.perturb) replay too."""
import dataclasses

import pytest
import torch

from distzo2_lab.config import ConfigError, OffloadConfig, TrainConfig, ZOConfig, validate
from distzo2_lab.models import OPTAdapter, build_model
from distzo2_lab.zo.engine import ZO2Engine
from distzo2_lab.zo.perturb import Perturber, frozen_spans
from distzo2_lab.zo.reference import EagerMeZO
from tests.helpers import batches, masters_equal, run

FREEZE = ("*embed_tokens*", "*layers.0.self_attn.k_proj.*")


def _pair(zo):
    return (EagerMeZO(OPTAdapter(build_model("tiny", seed=7)), zo),
            ZO2Engine(OPTAdapter(build_model("tiny", seed=7)), zo))


@pytest.mark.parametrize("perturb", ["auto", "copy"])
def test_frozen_parameters_never_move_and_the_engine_equals_the_reference(perturb):
    zo = ZOConfig(weight_decay=0.1, lr=1e-2, freeze=FREEZE, perturb=perturb)
    eager, engine = _pair(zo)
    before = {n: p.detach().clone() for n, p in engine.adapter.model.named_parameters()}
    bs = batches(3, batch=4)
    ref, got = run(eager, bs), run(engine, bs)
    engine.flush()
    assert [r.to_dict() for r in ref] == [r.to_dict() for r in got]
    assert masters_equal(eager.adapter, engine.adapter)
    moved = {}
    for b in engine.adapter.buckets:
        b.sync()
        for s in b.slots:
            moved[s.name] = not torch.equal(b.master[s.start : s.stop], before[s.name].reshape(-1))
    frozen = [n for n in moved if "embed_tokens" in n or "layers.0.self_attn.k_proj." in n]
    assert len(frozen) == 3 and not any(moved[n] for n in frozen)  # tokens (tied head), k_proj weight + bias
    assert all(moved[n] for n in moved if n not in frozen)  # everything else was trained


def test_freeze_changes_the_estimate_and_streams_and_replays(tmp_path):
    """The host tier equals the resident run and writes back no frozen span; the seed log rebuilds
    the weights (the frozen spans' z is 0 in the replay too); copies replay without the round trip."""
    from distzo2_lab.run.checkpoint import digest
    from distzo2_lab.run.train import rebuild, train

    base = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, zo=ZOConfig(weight_decay=0.1))
    cfg = dataclasses.replace(base, zo=dataclasses.replace(base.zo, freeze=FREEZE))
    plain, frozen = train(base, progress=False), train(cfg, out=str(tmp_path / "f"), progress=False)
    assert plain["steps"][0]["loss_plus"] != frozen["steps"][0]["loss_plus"]
    host = train(validate(dataclasses.replace(cfg, offload=OffloadConfig(tier="host"))), progress=False)
    assert host["steps"] == frozen["steps"] and host["digest"] == frozen["digest"]
    spans = frozen_spans(OPTAdapter(build_model("tiny")).buckets, FREEZE)
    held = sum(y - x for k, s in spans.items() if k.startswith("block.") for x, y in s)
    assert held > 0 and host["bytes_down_per_step"] == host["bytes_up_per_step"] - 4 * held  # frozen spans stay
    assert digest(rebuild(str(tmp_path / "f" / "seedlog.jsonl"))) == frozen["digest"]
    copies = dataclasses.replace(base, zo=dataclasses.replace(base.zo, perturb="copy"))
    c = train(copies, out=str(tmp_path / "c"), progress=False)
    assert digest(rebuild(str(tmp_path / "c" / "seedlog.jsonl"))) == c["digest"]


def test_pertp_with_frozen_parameters_equals_the_single_rank():
    from distzo2_lab.parallel.launch import launch
    from distzo2_lab.parallel.layout import Layout
    from distzo2_lab.run.train import train
    from distzo2_lab.run.worker import train_worker

    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, threads=1, zo=ZOConfig(freeze=FREEZE))
    single = train(cfg, progress=False)
    got = launch(train_worker, 2, args=(cfg, Layout(dp=1, pert=2), None), timeout=240).wait()
    assert {r["digest"] for r in got.values()} == {single["digest"]} and got[0]["steps"] == single["steps"]


def test_frozen_spans_and_bad_patterns():
    a = OPTAdapter(build_model("tiny", seed=0))
    spans = frozen_spans(a.buckets, FREEZE)
    block0 = a.blocks[0]
    k = [s for s in block0.slots if ".k_proj." in s.name]
    assert spans[block0.key] == [(k[0].start, k[-1].stop)]  # weight and bias merged
    p = Perturber("gaussian").freeze(a.buckets, FREEZE)
    z = p.noise_for(3, block0.key, block0.numel)
    assert not z[k[0].start : k[-1].stop].any() and z[k[-1].stop :].abs().sum() > 0
    assert all(not (a_ < k[-1].stop and b_ > k[0].start) for a_, b_ in p.decay_spans(block0))
    for c0 in (max(k[0].start - 100, 0), k[-1].stop - 100):  # slices across each end of the frozen span
        assert torch.equal(p.noise_for(3, block0.key, 4096, start=c0), z[c0 : c0 + 4096])
    with pytest.raises(ConfigError, match="zo.freeze pattern 'nothing\\*' matches no parameter; names look like"):
        frozen_spans(a.buckets, ("nothing*",))
    with pytest.raises(ConfigError, match="zo.freeze=.* is not valid; it must be a tuple of non-empty glob"):
        validate(TrainConfig(zo=ZOConfig(freeze=("",))))
    assert ZOConfig(freeze=["*bias"]).freeze == ("*bias",)  # from JSON
