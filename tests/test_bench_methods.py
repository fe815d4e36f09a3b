"""The method family side by side: each short run follows `distzo2 train`'s path and reports its costs."""
import math

import pytest

from distzo2_lab.bench.methods import method_rows, method_table, run_method
from distzo2_lab.config import STATE_FLOATS, ConfigError, TrainConfig, ZOConfig, forwards_per_step
from distzo2_lab.run.train import train


@pytest.mark.parametrize("zo", [ZOConfig(lr=1e-3), ZOConfig(optimizer="adam", lr=1e-3)])
def test_a_method_run_ends_where_train_ends(zo):
    r = run_method(zo, 3, eval_every=2, batch_size=2, seq_len=8)
    s = train(TrainConfig(model="tiny", engine="eager", zo=zo, batch_size=2, seq_len=8, steps=3, threads=1))
    assert [t for t, _ in r.eval_losses] == [0, 2, 3]
    assert r.eval_losses[0][1] == s["eval_loss_start"] and r.eval_losses[-1][1] == s["eval_loss_end"]


@pytest.mark.parametrize("zo", [ZOConfig(optimizer="hizoo"), ZOConfig(optimizer="conservative"),
                                ZOConfig(estimator="one-sided", directions=2)])
def test_a_method_run_reports_its_forwards_and_the_state_it_holds(zo):
    r = run_method(zo, 1, batch_size=2, seq_len=8)
    assert r.forwards == forwards_per_step(zo) > 2
    assert r.state_bytes == r.planned_state_bytes == 4 * STATE_FLOATS[zo.optimizer] * r.params
    assert math.isfinite(r.eval_losses[-1][1]) and r.step_s > 0


def test_method_table_has_one_row_per_run():
    runs = [run_method(ZOConfig(optimizer=name), 1, label=name.upper(), batch_size=2, seq_len=8)
            for name in ("sgd", "momentum")]
    assert [w["method"] for w in method_rows(runs)] == ["SGD", "MOMENTUM"]
    table = method_table(runs).splitlines()
    assert len(table) == 4 and table[2].startswith("| SGD |") and table[3].startswith("| MOMENTUM |")
    assert method_rows(runs)[1]["state_kib"] == runs[1].params * 4 / 2**10


def test_a_method_run_refuses_a_non_positive_eval_interval():
    with pytest.raises(ConfigError, match="eval_every=0 is not valid"):
        run_method(ZOConfig(), 1, eval_every=0)
