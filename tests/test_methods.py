"""The ZO method family: each update rule by hand, on slices, with its state, and on the tiny model."""
import math

import pytest
import torch
from helpers import batches

from distzo2_lab.cli.main import DEFAULT_LR
from distzo2_lab.config import STATE_FLOATS, ConfigError, ZOConfig, forwards_per_step, validate_zo
from distzo2_lab.models import OPTAdapter, build_model
from distzo2_lab.seeds import step_seed
from distzo2_lab.zo import directions as dirs
from distzo2_lab.zo.estimators import curvature, one_sided
from distzo2_lab.zo.family_reference import EagerFamily
from distzo2_lab.zo.methods import METHODS, Scalars, apply_

THETA = [1.0, -2.0, 0.5, 0.0]
Z = [1.0, -1.0, 2.0, 0.0]


def _rule(name, g=2.0, lr=0.1, state=None, **kw):
    theta = torch.tensor(THETA)
    state = state if state is not None else METHODS[name].init_state(4, "cpu")
    apply_(METHODS[name], theta, torch.tensor(Z), state, Scalars(g=g, lr=lr, **kw))
    return theta.tolist(), {k: v.tolist() for k, v in state.items()}


def test_sgd_and_sign_rules_by_hand():
    assert _rule("sgd")[0] == pytest.approx([0.8, -1.8, 0.1, 0.0])  # theta - 0.1 * 2 z
    assert _rule("sign")[0] == pytest.approx([0.9, -1.9, 0.4, 0.0])  # theta - 0.1 sign(2 z)
    assert _rule("sign", g=-2.0)[0] == pytest.approx([1.1, -2.1, 0.6, 0.0])


def test_momentum_rule_accumulates_by_hand():
    theta, st = _rule("momentum", beta=0.5)
    assert st["m"] == pytest.approx([2.0, -2.0, 4.0, 0.0]) and theta == pytest.approx([0.8, -1.8, 0.1, 0.0])
    state = {"m": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    theta, st = _rule("momentum", beta=0.5, state=state)
    assert st["m"] == pytest.approx([2.5, -1.5, 4.5, 0.5])  # 0.5 m + 2 z
    assert theta == pytest.approx([0.75, -1.85, 0.05, -0.05])


def test_adam_first_step_is_lr_times_sign_by_hand():
    theta, st = _rule("adam", t=1)
    # m = 0.1 * 2z, v = 0.001 * 4z^2; bias-corrected m_hat / sqrt(v_hat) = sign(z) where z != 0
    assert st["m"] == pytest.approx([0.2, -0.2, 0.4, 0.0]) and st["v"] == pytest.approx([0.004, 0.004, 0.016, 0.0])
    assert theta == pytest.approx([0.9, -1.9, 0.4, 0.0], abs=1e-6)


def test_conservative_keeps_or_drops_the_whole_step():
    assert _rule("conservative", accept=True)[0] == pytest.approx([0.8, -1.8, 0.1, 0.0])
    theta = torch.tensor(THETA)
    apply_(METHODS["conservative"], theta, torch.tensor(Z), {}, Scalars(g=2.0, lr=0.1, accept=False), 0.5, [(0, 4)])
    assert theta.tolist() == THETA  # nor the weight decay


def test_hizoo_preconditions_and_updates_the_hessian_by_hand():
    state = {"h": torch.tensor([4.0, 1.0, 1.0, 1.0])}
    theta, st = _rule("hizoo", state=state, smooth=0.5, curvature=2.0)
    assert theta == pytest.approx([0.9, -1.8, 0.1, 0.0])  # theta - 0.1 * 2 z / sqrt(h)
    assert st["h"] == pytest.approx([4 * (0.5 + 1.0), 1.5, 1 * (0.5 + 4.0), 0.5])  # h (1 - a + a c z^2)


def test_weight_decay_is_decoupled_and_only_on_decay_spans():
    theta = torch.tensor(THETA)
    apply_(METHODS["sgd"], theta, torch.zeros(4), {}, Scalars(g=1.0, lr=0.1), 0.5, [(1, 3)], offset=0)
    assert theta.tolist() == pytest.approx([1.0, -1.9, 0.475, 0.0])


@pytest.mark.parametrize("name", list(METHODS))
def test_each_rule_on_two_slices_equals_the_whole(name):
    g = torch.Generator().manual_seed(1)
    theta, d = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    spans, s = [(100, 700)], Scalars(g=0.3, lr=0.01, t=3, curvature=5.0, smooth=0.1)
    whole, halves = theta.clone(), theta.clone()
    sw, sh = METHODS[name].init_state(1000, "cpu"), METHODS[name].init_state(1000, "cpu")
    apply_(METHODS[name], whole, d, sw, s, 0.1, spans)
    for a, b in ((0, 377), (377, 1000)):
        apply_(METHODS[name], halves[a:b], d[a:b], {k: v[a:b] for k, v in sh.items()}, s, 0.1, spans, offset=a)
    assert torch.equal(whole, halves) and all(torch.equal(sw[k], sh[k]) for k in sw)


def test_state_declarations_match_the_planner_table():
    assert {n: m.floats_per_param for n, m in METHODS.items()} == STATE_FLOATS


def _family(**zo):
    return EagerFamily(OPTAdapter(build_model("tiny", seed=7)), ZOConfig(**zo))


@pytest.mark.parametrize("perturbation", ["lowrank:2", "sparse:0.5"])
def test_structured_z_of_two_slices_equals_the_whole(perturbation):
    e = _family(perturbation=perturbation)
    e._refresh(11)
    b = e.adapter.blocks[0]
    whole = e.z(b, 11)
    parts = torch.cat([e.z(b, 11, 0, 1234), e.z(b, 11, 1234, b.numel - 1234)])
    assert torch.equal(whole, parts)
    if perturbation.startswith("sparse"):
        kept = (whole != 0).float().mean().item()
        assert 0.45 < kept < 0.55  # about half of each tensor: its smallest |theta|


def test_lowrank_z_of_a_weight_matrix_has_rank_r_and_vectors_stay_dense():
    e = _family(perturbation="lowrank:2")
    e._refresh(5)
    b = e.adapter.blocks[0]
    z = e.z(b, 5)
    for slot in b.slots:
        piece = z[slot.start : slot.stop].view(slot.shape)
        if dirs.is_lowrank(slot.shape, 2):
            assert torch.linalg.matrix_rank(piece).item() == 2
        else:
            assert (piece != 0).all()


def test_estimators_by_hand():
    assert curvature(3.0, 2.0, 2.0, 0.5) == pytest.approx(2.0)  # |3 + 2 - 4| / (2 * 0.25)
    g = one_sided([3.0, 1.0], 1.0, 0.5)  # sigma = sqrt(2)
    assert g == pytest.approx([2.0 / (0.5 * math.sqrt(2)), 0.0])
    assert one_sided([1.0, 1.0], 0.0, 0.5) == [0.0, 0.0]


def test_forwards_per_step_of_each_method():
    assert forwards_per_step(ZOConfig()) == 2
    assert forwards_per_step(ZOConfig(optimizer="hizoo")) == 3
    assert forwards_per_step(ZOConfig(optimizer="conservative")) == 4
    assert forwards_per_step(ZOConfig(estimator="one-sided", directions=4)) == 5


@pytest.mark.parametrize("zo, field", [
    (ZOConfig(optimizer="hizoo", perturbation="lowrank:2"), "zo.optimizer='hizoo'"),
    (ZOConfig(perturbation="sparse:1.5"), "zo.perturbation='sparse:1.5' is not valid"),
    (ZOConfig(momentum=1.0), "zo.momentum=1.0 is not valid"),
    (ZOConfig(optimizer="adam", perturb="in-place"), "zo.perturb='in-place' with zo.optimizer='adam'"),
])
def test_invalid_method_settings_are_refused_by_name(zo, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        validate_zo(zo)


def test_state_round_trip_continues_bit_exactly():
    bs = batches(4, batch=2, seq=8)
    a, b = _family(optimizer="adam", lr=1e-3), _family(optimizer="adam", lr=1e-3)
    for t in range(2):
        a.step(bs[t], step_seed(0, t))
        b.step(bs[t], step_seed(0, t))
    c = _family(optimizer="adam", lr=1e-3)
    for x, y in zip(c.adapter.buckets, b.adapter.buckets):
        x.master.copy_(y.master)
        x.sync()
    c.load_state_dict(b.state_dict())
    for t in range(2, 4):
        ra, rc = a.step(bs[t], step_seed(0, t)), c.step(bs[t], step_seed(0, t))
        assert (ra.loss_plus, ra.grad) == (rc.loss_plus, rc.grad)
    assert all(torch.equal(x.master, y.master) for x, y in zip(a.adapter.buckets, c.adapter.buckets))


LEARNS = {"sign": {"directions": 4}}  # sign() of one direction on one batch is too noisy: average four


@pytest.mark.parametrize("name", list(DEFAULT_LR))
def test_each_optimizer_lowers_the_tiny_model_loss_by_ten_percent_in_300_steps(name):
    """The eager reference at the CLI's default rate for the tiny presets (the CLI's own run of
    each optimiser: tests/test_cli.py)."""
    torch.set_num_threads(1)
    e = _family(optimizer=name, lr=DEFAULT_LR[name][0], **LEARNS.get(name, {}))
    batch = batches(1, batch=4, seq=12)[0]
    start = e.evaluate(batch)
    for t in range(300):
        e.step(batch, step_seed(0, t))
    assert e.evaluate(batch) <= 0.9 * start


def test_one_sided_lowrank_and_sparse_lower_the_loss():
    batch = batches(1, batch=4, seq=12)[0]
    for zo in (dict(estimator="one-sided", directions=2, noise="rademacher", perturbation="rademacher", lr=1e-7),
               dict(perturbation="lowrank:2", lr=3e-3), dict(perturbation="sparse:0.5", lr=1e-2)):
        e = _family(**zo)
        start = e.evaluate(batch)
        for t in range(100):
            e.step(batch, step_seed(0, t))
        assert e.evaluate(batch) < start, zo
