"""The eager MeZO step is the oracle: the ZO2 engine must match it bit for bit."""
import pytest
import torch
from helpers import batches, engine_pair, masters_equal, run

from distzo2_lab.config import PrecisionConfig, ZOConfig
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo.perturb import Perturber

CASES = {
    "fp32": (ZOConfig(), PrecisionConfig()),
    "bf16-compute": (ZOConfig(), PrecisionConfig(compute="bf16")),
    "bf16-storage": (ZOConfig(), PrecisionConfig(compute="bf16", storage="bf16")),
    "fp16-storage": (ZOConfig(), PrecisionConfig(compute="fp16", storage="fp16")),
    "rademacher+wd": (ZOConfig(noise="rademacher", weight_decay=0.1), PrecisionConfig()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_steps_are_bit_identical_to_the_eager_reference(case):
    zo, prec = CASES[case]
    eager, engine = engine_pair(zo, prec)
    bs = batches(6)
    for r_ref, r in zip(run(eager, bs), run(engine, bs)):
        assert (r.loss_plus, r.loss_minus, r.grad) == (r_ref.loss_plus, r_ref.loss_minus, r_ref.grad)
    assert not masters_equal(eager.adapter, engine.adapter)  # the last update is still pending
    engine.flush()
    assert masters_equal(eager.adapter, engine.adapter)


def test_two_noise_threads_give_the_same_steps_as_one():
    _, one = engine_pair(threads=1)
    _, two = engine_pair(threads=2)
    bs = batches(3)
    assert [r.grad for r in run(one, bs)] == [r.grad for r in run(two, bs)]


def test_pending_update_is_explicit_and_flushed_once():
    _, engine = engine_pair()
    assert engine.pending is None
    r = run(engine, batches(1))[0]
    p = engine.pending
    assert (p.step, p.seed, p.grad, p.lr) == (0, r.seed, r.grad, r.lr)
    engine.flush()
    assert engine.pending is None
    before = [b.master.clone() for b in engine.adapter.buckets]
    engine.flush()  # nothing left to apply
    assert all(torch.equal(x, b.master) for x, b in zip(before, engine.adapter.buckets))


def test_evaluation_never_runs_on_stale_weights():
    eager, engine = engine_pair()
    bs = batches(3)
    run(eager, bs)
    run(engine, bs)
    probe = batches(1, seed=9)[0]
    assert engine.evaluate(probe) == eager.evaluate(probe)
    assert engine.pending is None


def test_tied_weight_is_perturbed_and_updated_exactly_once():
    zo = ZOConfig(lr=1e-2, eps=1e-2)
    eager, engine = engine_pair(zo)
    model = engine.adapter.model
    w0 = model.lm_head.weight.detach().clone()
    batch = batches(1)[0]
    seed = step_seed(0, 0)
    # Oracle built by hand on a copy: every unique tensor moved by +eps z exactly once.
    ref = eager.adapter
    zs = {b.key: Perturber().noise_for(seed, b.key, b.numel) for b in ref.buckets}
    with torch.no_grad():
        for b in ref.buckets:
            b.master.add_(zs[b.key], alpha=zo.eps)
        hand_loss_plus = float(ref.loss(ref.forward(batch["input_ids"]), batch["input_ids"]))
        for b in ref.buckets:
            b.master.add_(zs[b.key], alpha=-zo.eps)
    r = engine.step(batch, seed)
    assert r.loss_plus == pytest.approx(hand_loss_plus, abs=1e-6)
    engine.flush()
    z_tied = zs["in"][: w0.numel()].view_as(w0)
    expected = w0 + zo.eps * z_tied - 2 * zo.eps * z_tied + zo.eps * z_tied - zo.lr * r.grad * z_tied
    assert torch.allclose(model.lm_head.weight, expected, atol=1e-6)
    twice = expected - zo.lr * r.grad * z_tied  # what a double update would give
    assert not torch.allclose(model.lm_head.weight, twice, atol=1e-6)


def test_in_place_engine_generates_noise_twice_per_step_and_eager_four_times():
    counts = {}
    eager, engine = engine_pair(ZOConfig(perturb="in-place"))
    for name, e in (("eager", eager), ("engine", engine)):
        calls, fill = [], e.perturber.fill

        def counting_fill(out, seed, key, start=0, _fill=fill, _calls=calls):
            _calls.append(out.numel())
            return _fill(out, seed, key, start)

        e.perturber.fill = counting_fill
        run(e, batches(3))
        counts[name] = sum(calls)
    n = sum(b.numel for b in engine.adapter.buckets)
    assert counts["eager"] == 4 * 3 * n
    assert counts["engine"] == (1 + 2 + 2) * n  # step 0 has no pending update


def test_copies_engine_reads_each_element_once_per_step_and_computes_z_twice(monkeypatch):
    """The fused pass: one pass over every element per step that applies the pending update (z of
    the previous step) and writes both copies (z of this step), z never stored; the eager reference
    makes each copy and the update in passes of their own."""
    from distzo2_lab.zo import noise

    eager, engine = engine_pair()
    n = sum(b.numel for b in engine.adapter.buckets)
    for e, passes, zs in ((engine, 3 * n, (1 + 2 + 2) * n), (eager, 3 * 3 * n, 3 * 3 * n)):
        seen = {"elements": 0, "z": 0}
        visit = noise.visit_

        def counting(master, start, kind, updates, *args, _seen=seen, **kw):
            noisy = (args[1] if len(args) > 1 else kw.get("cur_key")) is not None
            _seen["elements"] += master.numel()
            _seen["z"] += master.numel() * (len(list(updates)) + noisy)
            return visit(master, start, kind, updates, *args, **kw)

        monkeypatch.setattr(noise, "visit_", counting)
        run(e, batches(3))
        monkeypatch.setattr(noise, "visit_", visit)
        assert (seen["elements"], seen["z"]) == (passes, zs), type(e).__name__