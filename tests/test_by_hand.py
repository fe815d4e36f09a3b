"""The parallel pieces built by hand (parallel/by_hand.py), launched through the project's
launcher, against the one-rank engine: PertP bit for bit, DDP and 2D within float order."""
import pytest

from distzo2_lab.parallel.by_hand import ddp_worker, max_differences, mesh_worker, one_rank, pertp_pair_worker
from distzo2_lab.parallel.launch import launch

STEPS = 3


@pytest.fixture(scope="module")
def single():
    return one_rank(STEPS)


def test_pertp_pair_by_hand_is_bit_exact_with_one_rank(single):
    results = launch(pertp_pair_worker, 2, args=(STEPS,), timeout=240).wait()
    assert results[0]["signs"] == (True, False) and results[1]["signs"] == (False, True)
    assert results[0]["steps"] == results[1]["steps"] == single["steps"]  # l+, l-, g per step
    assert {r["digest"] for r in results.values()} == {single["digest"]}
    assert results[0]["exchange_bytes"] == 32  # four float64 scalars per step


def test_ddp_by_hand_matches_one_rank_within_float_order(single):
    results = launch(ddp_worker, 2, args=(STEPS,), timeout=240).wait()
    assert results[0]["steps"] == results[1]["steps"] and results[0]["digest"] == results[1]["digest"]
    rel, dg = max_differences(results[0]["steps"], single["steps"])
    assert rel < 1e-5 and dg < 5e-3, (rel, dg)


def test_sliced_mesh_by_hand_matches_ddp_bit_for_bit_and_one_rank_within_float_order(single):
    ddp = launch(ddp_worker, 2, args=(STEPS,), timeout=240).wait()
    mesh = launch(mesh_worker, 4, args=(STEPS,), timeout=240).wait()
    assert [mesh[r]["coords"] for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["digest"] for r in mesh.values()} == {ddp[0]["digest"]}  # the pert split changes no number
    assert mesh[0]["steps"] == ddp[0]["steps"]
    assert mesh[0]["exchange_bytes"] == 2 * 32  # the pert pair, then the dp group
    rel, dg = max_differences(mesh[0]["steps"], single["steps"])
    assert rel < 1e-5 and dg < 5e-3, (rel, dg)
