"""The node's shared masters in one process: members are threads, each with its own adapter of the
same model and its own file descriptors (flock locks conflict between descriptors, as between
processes). Multi-process runs with real gloo groups are in test_distributed.py."""
import threading
from types import SimpleNamespace

import pytest
import torch

from distzo2_lab.models.opt import OPTAdapter
from distzo2_lab.models.presets import build_model
from distzo2_lab.parallel.master_share import MasterShare
from distzo2_lab.zo.perturb import Perturber

GRAIN = 4096  # a tiny block (49,984 elements) is 13 grains


def adapter():
    return OPTAdapter(build_model("tiny", seed=3))


def together(size, fn):
    """fn(i) on `size` threads at once; their results in member order."""
    out, errors = [None] * size, []

    def run(i):
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(size)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return out


def node(size, signs):
    """`size` members holding the masters of their own copy of one model once between them."""
    barrier = threading.Barrier(size)
    adapters = [adapter() for _ in range(size)]
    perturber = Perturber("gaussian")

    def join(i):
        group = SimpleNamespace(ranks=tuple(range(size)), index=i, size=size, barrier=barrier.wait)
        return MasterShare(adapters[i], perturber, group, f"test{size}", signs, torch.float32, grain=GRAIN)

    return adapters, together(size, join)


@pytest.mark.parametrize("signs", [[(True, True), (True, True)], [(True, False), (False, True)]])
def test_shared_masters_are_updated_once_and_copied_as_each_rank_alone(signs):
    """Two members (DDP: both signs each; PertP: one sign each) visit every bucket for three steps,
    a pending update first: the one shared master equals a lone rank's after each step, every
    copy equals the lone rank's fused pass, and the members' computed elements add up to one
    node's work."""
    union = tuple(any(s[k] for s in signs) for k in (0, 1))
    adapters, shares = node(2, union)
    alone, perturber, eps = adapter(), Perturber("gaussian"), 1e-3
    for step in range(3):
        terms, keep = ([(100 + step - 1, -0.01)], 0.99) if step else ([], 1.0)
        for k, b in enumerate(alone.buckets):
            plus, minus = torch.empty(b.numel), torch.empty(b.numel)
            perturber.visit(b, b.master, terms, keep, 100 + step, eps, plus, minus)

            def visit(i, k=k, terms=terms, keep=keep, seed=100 + step):
                return shares[i].copies(adapters[i].buckets[k], terms, keep, seed, eps, signs[i])

            got = together(2, visit)
            for i in range(2):
                assert torch.equal(adapters[i].buckets[k].master, b.master)
                for sign, want in ((0, plus), (1, minus)):
                    assert (got[i][sign] is None) != signs[i][sign]
                    if signs[i][sign]:
                        assert torch.equal(got[i][sign], want)
    # a flush: the update alone, once
    for k, b in enumerate(alone.buckets):
        perturber.visit(b, b.master, [(7, -0.5)], 1.0)
        together(2, lambda i, k=k: shares[i].update(adapters[i].buckets[k], [(7, -0.5)], 1.0))
        assert torch.equal(adapters[0].buckets[k].master, b.master)
    assert shares[0].served == shares[1].served == 4 * sum(b.numel for b in alone.buckets)
    assert shares[0].computed + shares[1].computed == shares[0].served
    for s in shares:
        s.close()


def test_a_late_member_finds_the_update_done_and_computes_nothing():
    adapters, (a, b) = node(2, (True, True))
    want = adapter()
    bucket = want.blocks[0]
    perturber = Perturber("gaussian")
    perturber.visit(bucket, bucket.master, [(5, -0.1)], 1.0, 6, 1e-3)
    a.copies(adapters[0].blocks[0], [(5, -0.1)], 1.0, 6, 1e-3, (True, True))  # b is not there yet
    assert a.computed == bucket.numel and torch.equal(adapters[1].blocks[0].master, bucket.master)
    b.copies(adapters[1].blocks[0], [(5, -0.1)], 1.0, 6, 1e-3, (True, True))  # applied once, not twice
    assert b.computed == 0 and torch.equal(adapters[1].blocks[0].master, bucket.master)
    a.close(), b.close()


def test_offloaded_or_bf16_masters_are_refused():
    a = adapter()
    a.blocks[0].master = None  # an offloaded block: its values live in a store
    group = SimpleNamespace(ranks=(0,), index=0, size=1, barrier=lambda: None)
    with pytest.raises(ValueError, match="resident fp32 masters"):
        MasterShare(a, Perturber("gaussian"), group, "refused", (True, True), torch.float32)
