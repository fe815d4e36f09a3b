"""Scaling benchmark on the tiny model: result shape, positivity, every valid layout ran; never timings."""
import math

from distzo2_lab.bench_scaling import format_scaling, layouts_for, scaling, threads_per_rank


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_layouts_and_threads():
    assert [n for n, _ in layouts_for(1, 4)] == ["single"]
    assert [n for n, _ in layouts_for(4, 4)] == ["PertP", "DDP", "2D"]
    assert [threads_per_rank(w, 2) for w in (1, 2, 4)] == [2, 1, 1]


def test_scaling_runs_every_valid_layout():
    r = scaling("tiny", batch=4, seq=12, steps=1, total_threads=2, forward_repeats=1, timeout=300)
    for key in ("model", "batch", "seq", "steps", "total_threads", "forward_s_total_threads",
                "forward_s_single_thread_concurrent", "concurrency_gain", "rows", "skipped", "notes"):
        assert key in r
    ran = {(row["layout"], row["world"]) for row in r["rows"]}
    assert ran == {("single", 1), ("PertP", 2), ("DDP", 2), ("DDP", 4), ("2D", 4)}
    assert [(s["layout"], s["world"]) for s in r["skipped"]] == [("PertP", 4)]  # pert must be 1 or 2
    for row in r["rows"]:
        for key in ("seconds", "tokens_per_s", "vs_world1", "ideal_tokens_per_s", "of_ideal"):
            assert _positive(row[key]), (row["layout"], row["world"], key, row[key])
        assert len(row["rank_seconds"]) == row["world"]
        assert row["oversubscribed"] == (row["world"] == 4)
    assert _positive(r["forward_s_total_threads"]) and _positive(r["forward_s_single_thread_concurrent"])
    assert any("oversubscribe" in n for n in r["notes"])
    text = format_scaling(r)
    assert "2D" in text and "oversubscribed" in text
