"""Scaling benchmark on the tiny model: result shape, positivity, every valid layout ran; never timings."""
import dataclasses
import math

from distzo2_lab.bench.scaling import format_scaling, layouts_for, scaling, threads_per_rank


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_layouts_and_threads():
    assert [n for n, _ in layouts_for(1, 4)] == ["single"]
    assert [n for n, _ in layouts_for(4, 4)] == ["PertP", "DDP", "2D"]
    assert [threads_per_rank(w, 2) for w in (1, 2, 4)] == [2, 1, 1]


def test_scaling_runs_every_valid_layout():
    seen = []
    r = scaling("tiny", batch=4, seq=12, steps=1, total_threads=2, forward_repeats=1, timeout=300, repeats=2,
                perturb="copy", progress=seen.append)
    assert len(seen) == 2 * 5 and seen[0] == "round 1/2: single world 1"  # 5 layouts, round-robin, 2 rounds
    for key in ("model", "batch", "seq", "steps", "total_threads", "forward_s_total_threads",
                "forward_s_single_thread_concurrent", "concurrency_gain", "rows", "skipped", "notes"):
        assert key in r
    ran = {(row["layout"], row["world"]) for row in r["rows"]}
    assert ran == {("single", 1), ("PertP", 2), ("DDP", 2), ("DDP", 4), ("2D", 4)}
    assert [(s["layout"], s["world"]) for s in r["skipped"]] == [("PertP", 4)]  # pert must be 1 or 2
    for row in r["rows"]:
        for key in ("seconds", "tokens_per_s", "vs_world1", "ideal_tokens_per_s", "of_ideal",
                    "ideal_two_rank_tokens_per_s", "of_ideal_two_rank", "step_forward_s", "ideal_layout_tokens_per_s",
                    "of_ideal_layout"):
            assert _positive(row[key]), (row["layout"], row["world"], key, row[key])
        assert len(row["rank_seconds"]) == row["world"] and len(row["tokens_per_s_runs"]) == 2
        assert row["tokens_per_s"] == max(row["tokens_per_s_runs"])  # best of the rounds
        # one rank draws all of z; with several, rank 0 drew what it claimed first (all-or-nothing possible)
        assert row["shared_fraction"] == 1.0 if row["world"] == 1 else 0 <= row["shared_fraction"] <= 1
        assert row["oversubscribed"] == (row["world"] == 4)
    assert _positive(r["forward_s_total_threads"]) and _positive(r["forward_s_single_thread_concurrent"])
    # T1c per world: the world-2 and world-4 ranks' own concurrent forwards give each world's ideal
    t1 = r["forward_s_concurrent_by_world"]
    assert set(t1) == {2, 4} and t1[2] == r["forward_s_single_thread_concurrent"]
    base = next(row["tokens_per_s"] for row in r["rows"] if row["world"] == 1)
    for row in r["rows"]:
        w = row["world"]
        want = base if w == 1 else base * w * r["forward_s_total_threads"] / t1[w]
        assert math.isclose(row["ideal_tokens_per_s"], want)
        assert math.isclose(row["ideal_two_rank_tokens_per_s"],
                            base if w == 1 else base * 2 * r["forward_s_total_threads"] / t1[2])
    assert "concurrent single-threaded ranks (taking turns" in format_scaling(r)
    # each layout's own forwards: world 1's ideal is itself; the others scale by F(world 1) / F(layout)
    one = next(row for row in r["rows"] if row["world"] == 1)
    assert math.isclose(one["ideal_layout_tokens_per_s"], one["tokens_per_s"])
    for row in r["rows"]:
        assert math.isclose(row["ideal_layout_tokens_per_s"], base * one["step_forward_s"] / row["step_forward_s"])
    assert "% layout" in format_scaling(r)
    assert any("oversubscribe" in n for n in r["notes"])
    assert r["forward_s_total_threads"] == min(r["forward_s_total_threads_runs"])
    text = format_scaling(r)
    assert "2D" in text and "oversubscribed" in text and "split by its ranks" in text
    assert r["perturb"] == "copy" and "perturbation: copy" in text


def test_scaling_without_shared_noise_and_bad_input(monkeypatch):
    import pytest

    from distzo2_lab.bench.scaling import bench_worker
    from distzo2_lab.config import ConfigError, TrainConfig, ZOConfig
    from distzo2_lab.parallel.launch import launch
    from distzo2_lab.parallel.layout import Layout

    with pytest.raises(ConfigError, match="repeats=0 are not valid"):
        scaling("tiny", repeats=0)
    with pytest.raises(ConfigError, match="zo.perturb='inplace' is not valid; choose one of auto, in-place, copy"):
        scaling("tiny", perturb="inplace")
    # 4096-element grains: a tiny block (49,984 elements) is 13 chunks to split (with the default
    # 1M-element grain it fits one, and the ranks draw alone: tests/test_distributed.py)
    monkeypatch.setenv("DISTZO2_SHARE_GRAIN", "4096")
    cfg = TrainConfig(model="tiny", steps=2, batch_size=4, seq_len=12, threads=1,
                      zo=ZOConfig(perturb="in-place"))  # DDP ranks share the draws of z in place
    alone = launch(bench_worker, 2, (cfg, Layout(2, 1, share_noise=False), 1), 300).wait()
    assert [v["shared_fraction"] for v in alone.values()] == [1.0, 1.0]
    shared = launch(bench_worker, 2, (cfg, Layout(2, 1), 1), 300).wait()
    fractions = [v["shared_fraction"] for v in shared.values()]
    assert sum(fractions) == pytest.approx(1.0)  # every element made once, by whichever rank came first
    copies = launch(bench_worker, 2, (dataclasses.replace(cfg, zo=ZOConfig(perturb="copy")), Layout(2, 1), 1),
                    300).wait()  # copies: the node's one master, its updates and copies made once
    assert sum(v["shared_fraction"] for v in copies.values()) == pytest.approx(1.0)
    r = {"model": "tiny", "batch": 4, "seq": 12, "steps": 1, "total_threads": 2, "cpu_count": 2, "repeats": 1,
         "share_noise": False, "forward_s_total_threads": 1.0, "forward_s_single_thread_concurrent": 1.0,
         "concurrency_gain": 2.0, "rows": [], "skipped": [], "notes": []}
    assert "every rank does all of its work" in format_scaling(r)
