"""The node's noise share in one process: members are threads, each with its own NoiseShare and
its own file descriptor (flock locks conflict between descriptors, as between processes)."""
import os
import threading
import time

import pytest
import torch

from distzo2_lab.parallel.copy_share import CopyShare
from distzo2_lab.parallel.node_share import NoiseShare
from distzo2_lab.zo.perturb import Perturber

CHUNK = 1024


def members(tmp_path, size=2, slots=3, slot_elems=4 * CHUNK, timeout=60.0):
    perturber = Perturber("gaussian")
    barrier = threading.Barrier(size)
    path = str(tmp_path / "noise.bin")
    out = [None] * size

    def join(i):
        out[i] = NoiseShare(perturber, i, size, barrier.wait, path, create=i == 0, slot_elems=slot_elems,
                            slots=slots, timeout=timeout, grain=CHUNK)

    ts = [threading.Thread(target=join, args=(i,)) for i in range(size)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not os.listdir(tmp_path)  # both files unlinked once every member opened them
    return perturber, out


def test_a_late_member_finds_its_z_ready_and_draws_nothing(tmp_path):
    perturber, (a, b) = members(tmp_path, slots=4)  # a runs 4 pieces ahead of b
    n = 3 * CHUNK + 100  # a short last chunk
    want = perturber.noise_for(7, "block.0", n)
    za = a.view(torch.empty(n), 7, "block.0")  # b is not there: a draws every chunk itself
    assert torch.equal(za, want) and a.drawn == n
    zb = b.view(torch.empty(n), 7, "block.0")
    assert torch.equal(zb, want) and b.drawn == 0
    # a bucket larger than a slot is filled piece by piece, the same values
    big = 10 * CHUNK  # pieces of 4, 4 and 2 chunks
    fa, fb = torch.empty(big), torch.empty(big)
    a.fill(fa, 3, "embed")
    b.fill(fb, 3, "embed")
    assert torch.equal(fa, perturber.noise_for(3, "embed", big)) and torch.equal(fa, fb)
    assert a.drawn + b.drawn == a.served == b.served == n + big  # each element drawn exactly once
    a.close(), b.close()


def test_members_arriving_together_split_each_piece(tmp_path):
    perturber, share = members(tmp_path, size=2)
    n = 4 * CHUNK
    got = [[], []]

    def draw(i):
        for k in range(6):
            got[i].append(share[i].view(torch.empty(n), k, "block.0").clone())

    ts = [threading.Thread(target=draw, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(6):
        want = perturber.noise_for(k, "block.0", n)
        assert torch.equal(got[0][k], want) and torch.equal(got[1][k], want)
    assert share[0].drawn + share[1].drawn == 6 * n


def test_a_one_chunk_piece_is_drawn_by_every_member_alone(tmp_path):
    """One chunk has nothing to split (one member would draw while the others wait): each member
    draws it itself, the ring is never entered, the values are the same; a bucket's short last
    piece is drawn alone too."""
    perturber, (a, b) = members(tmp_path, slot_elems=2 * CHUNK)
    n = CHUNK - 10
    za, zb = a.view(torch.empty(n), 5, "ln"), b.view(torch.empty(n), 5, "ln")  # b alone: no wait for a
    assert torch.equal(za, perturber.noise_for(5, "ln", n)) and torch.equal(za, zb)
    assert a.alone == b.alone == n and a.drawn == b.drawn == a.served == 0 and a.ring.pieces == 0
    big = 2 * CHUNK + 100  # one shared piece of two chunks, then a 100-element piece alone
    fa, fb = torch.empty(big), torch.empty(big)
    t = threading.Thread(target=lambda: b.fill(fb, 3, "embed"))
    t.start()
    a.fill(fa, 3, "embed")
    t.join()
    assert torch.equal(fa, perturber.noise_for(3, "embed", big)) and torch.equal(fa, fb)
    assert a.drawn + b.drawn == a.served == b.served == 2 * CHUNK and a.alone == n + 100
    assert a.ring.pieces == b.ring.pieces == 1
    a.close(), b.close()


def test_a_one_chunk_copy_is_made_by_every_member_alone(tmp_path):
    """CopyShare: a block copy of one chunk is made by each member in its own buffer (nothing to
    split); a copy of two chunks goes through the shared slot. Both are theta + scale z exactly."""
    size, barrier, path = 2, threading.Barrier(2), str(tmp_path / "copies.bin")
    out = [None, None]

    def join(i):
        out[i] = CopyShare(i, size, barrier.wait, path, create=i == 0, slot_elems=2 * CHUNK, grain=CHUNK)

    ts = [threading.Thread(target=join, args=(i,)) for i in range(size)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    a, b = out
    master, z = torch.randn(2 * CHUNK), torch.randn(2 * CHUNK)
    small = master[: CHUNK - 3]
    ca, cb = a.copy(small, z, 1e-3), b.copy(small, z, 1e-3)  # b does not wait for a
    want = torch.add(small, z[: CHUNK - 3], alpha=1e-3)  # zo.perturbed_copy, each element one add
    assert torch.equal(ca, want) and torch.equal(cb, want) and ca.data_ptr() != cb.data_ptr()
    assert a.alone == b.alone == CHUNK - 3 and a.computed == b.served == 0 and a.ring.pieces == 0
    t = threading.Thread(target=lambda: out.append(b.copy(master, z, -1e-3).clone()))
    t.start()
    shared = a.copy(master, z, -1e-3).clone()
    t.join()
    assert torch.equal(shared, torch.add(master, z, alpha=-1e-3)) and torch.equal(out[-1], shared)
    assert a.computed + b.computed == 2 * CHUNK and a.ring.pieces == b.ring.pieces == 1
    a.close(), b.close()


def test_the_slot_ring_holds_a_member_at_most_slots_minus_one_pieces_ahead(tmp_path):
    perturber, (a, b) = members(tmp_path, slots=3)
    n = 2 * CHUNK
    views = [a.view(torch.empty(n), k, "b") for k in range(3)]  # pieces 0, 1, 2 fill the 3 slots
    done = threading.Event()

    def fourth():
        views.append(a.view(torch.empty(n), 3, "b"))  # slot 0 still holds piece 0, which b has not left
        done.set()

    t = threading.Thread(target=fourth)
    t.start()
    time.sleep(0.3)
    assert not done.is_set()  # held: b may still be reading piece 0
    assert torch.equal(b.view(torch.empty(n), 0, "b"), perturber.noise_for(0, "b", n))
    b.view(torch.empty(n), 1, "b")  # b moves past piece 0: its slot may be rewritten
    t.join(timeout=30)
    assert done.is_set() and torch.equal(views[3], perturber.noise_for(3, "b", n))


def test_a_member_that_never_comes_raises_after_the_timeout(tmp_path):
    _, (a, _b) = members(tmp_path, slots=2, timeout=0.5)
    a.view(torch.empty(2 * CHUNK), 0, "b")
    a.view(torch.empty(2 * CHUNK), 1, "b")
    with pytest.raises(RuntimeError, match="member 0 of 2 waited 0 s for a free shared slot.*died or hangs"):
        a.view(torch.empty(2 * CHUNK), 2, "b")


def test_invalid_arguments(tmp_path):
    p = Perturber("gaussian")
    with pytest.raises(ValueError, match="index=2 is not in"):
        NoiseShare(p, 2, 2, lambda: None, str(tmp_path / "x"), True, CHUNK)
    with pytest.raises(ValueError, match="slots=1 is not valid"):
        NoiseShare(p, 0, 2, lambda: None, str(tmp_path / "x"), True, CHUNK, slots=1)
