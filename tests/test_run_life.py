"""A run's whole life from the command line: defaults that fit the model and the machine, outputs
written as the run goes, Ctrl-C that keeps the work, resume messages, a failed rank in one
line, and the report of a user's own run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distzo2_lab.cli.main import _worker_failed, build_parser, config_from_args, main
from distzo2_lab.errors import WorkerError
from distzo2_lab.observe.events import Span
from distzo2_lab.observe.viz import loss_figure, timeline_figure
from distzo2_lab.parallel.launch import launch
from distzo2_lab.run.threads import default_threads

EXE = os.path.join(os.path.dirname(sys.executable), "distzo2")
SMALL = ["--batch-size", "2", "--seq-len", "12", "--threads", "1", "--no-progress"]


def _lines(path) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def _interrupt_when(p, log, lines: int, limit: float = 120.0) -> None:
    t0 = time.monotonic()
    while _lines(log) < lines:
        assert p.poll() is None and time.monotonic() - t0 < limit, p.communicate()
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)


def test_ctrl_c_keeps_the_seed_log_and_summary_and_says_how_to_resume(tmp_path):
    out, ck = tmp_path / "run", tmp_path / "ck"
    p = subprocess.Popen([EXE, "train", "--steps", "100000", *SMALL, "--out", str(out), "--save", str(ck)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _interrupt_when(p, out / "seedlog.jsonl", 40)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"--resume {ck}" in err
    s = json.load(open(out / "summary.json"))
    assert s["interrupted"] and not s["finished"] and s["next_step"] == len(s["steps"]) >= 39
    assert _lines(out / "seedlog.jsonl") == s["next_step"] + 1  # header + one record per finished step
    rebuilt = subprocess.run([EXE, "rebuild", str(out / "seedlog.jsonl"), "--json"], capture_output=True, text=True)
    assert json.loads(rebuilt.stdout.strip().splitlines()[-1])["digest"] == s["digest"]
    assert json.load(open(ck / "state.json"))["step"] == s["next_step"]


def test_two_ranks_stop_together_on_ctrl_c_without_warnings(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([EXE, "train", "--layout", "dp=1,pert=2", "--offload", "host", "--steps", "100000", *SMALL,
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _interrupt_when(p, out / "seedlog.jsonl", 5, limit=180)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "leaked" not in err and "KeyboardInterrupt" not in err, err
    assert "identical weights on every rank" in stdout and "interrupted: steps" in err
    assert json.load(open(out / "summary.json"))["interrupted"]


def test_summary_is_written_while_the_run_goes(tmp_path):
    from distzo2_lab.config import TrainConfig
    from distzo2_lab.run.train import SUMMARY_EVERY, train

    seen = []

    def on_step(r):
        if r.step == SUMMARY_EVERY:  # the summary of the first SUMMARY_EVERY steps is on disk
            seen.append(json.load(open(tmp_path / "summary.json")))

    train(TrainConfig(steps=SUMMARY_EVERY + 2, batch_size=2, seq_len=12, threads=1), out=str(tmp_path),
          progress=False, on_step=on_step)
    assert not seen[0]["finished"] and len(seen[0]["steps"]) == SUMMARY_EVERY
    assert json.load(open(tmp_path / "summary.json"))["finished"]


def test_resuming_a_checkpoint_names_the_step_and_the_changed_rate(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert main(["train", "--steps", "3", "--lr", "1e-3", *SMALL, "--out", str(tmp_path / "a"), "--save", ck]) == 0
    assert main(["train", "--steps", "5", "--lr", "2e-3", *SMALL, "--out", str(tmp_path / "b"), "--resume", ck]) == 0
    assert f"resuming {ck} at step 3 (lr 0.002, was 0.001)" in capsys.readouterr().err
    assert main(["train", "--steps", "6", *SMALL, "--out", str(tmp_path / "c"), "--resume", ck]) == 0
    text = capsys.readouterr()
    assert "lr 0.001 (the resumed run's last rate" in text.out and f"resuming {ck} at step 3\n" in text.err


def test_resuming_a_disk_store_names_the_step_and_the_changed_rate(tmp_path, capsys):
    store = str(tmp_path / "store")
    common = ["train", *SMALL, "--offload", "disk", "--store", store]
    assert main([*common, "--steps", "2", "--lr", "3e-3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--steps", "4", "--lr", "1e-4", "--out", str(tmp_path / "b")]) == 0
    assert f"resuming {store} at step 2 (lr 0.0001, was 0.003)" in capsys.readouterr().err


@pytest.mark.parametrize("model, lr", [("opt-1.3b", 1e-6), ("opt-125m", 1e-6), ("tiny", 3e-3), ("tiny-llama", 3e-3)])
def test_learning_rate_suits_the_model_when_not_given(model, lr, capsys):
    a = build_parser().parse_args(["train", "--model", model, "--threads", "1"])
    assert config_from_args(a).zo.lr == lr
    assert f"lr {lr:g} (" in capsys.readouterr().out


def test_default_threads_do_not_oversubscribe_a_small_or_busy_machine():
    assert default_threads(1, cores=2, load=0.0) == 1
    assert default_threads(1, cores=16, load=12.0) == 1
    assert default_threads(2, cores=16, load=0.0) == 4
    assert default_threads(4, cores=8, load=0.5) == 1


def test_help_shows_the_defaults():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "(default: 300)" in text and "(default: zo2)" in text


def test_each_run_without_out_gets_a_fresh_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "1", *SMALL]) == 0
    assert main(["train", "--steps", "1", *SMALL]) == 0
    runs = os.listdir(tmp_path / "runs" / "train")
    assert len(runs) == 2 and all(os.path.exists(tmp_path / "runs" / "train" / r / "summary.json") for r in runs)


def failing_worker(rank, world_size, q):
    if rank == 1:
        raise ValueError("bad shard on rank 1")
    return rank


def test_a_failed_rank_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, capsys):
    with pytest.raises(WorkerError) as e:
        launch(failing_worker, 2, timeout=120).wait()
    assert e.value.rank == 1 and e.value.cause == "ValueError: bad shard on rank 1"
    assert _worker_failed(e.value, str(tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"distzo2: error: rank 1 failed: ValueError: bad shard on rank 1; traceback in "
                   f"{tmp_path}/error.log")
    log = (tmp_path / "error.log").read_text()
    assert "Traceback" in log and "failing_worker" in log


def test_train_report_writes_the_demo_report(tmp_path, capsys):
    assert main(["train", "--steps", "6", *SMALL, "--offload", "host", "--out", str(tmp_path), "--report"]) == 0
    text = (tmp_path / "report.html").read_text()
    for heading in ("Overlap metrics", "Timeline", "Loss and projected gradient", "Bubbles"):
        assert heading in text, heading
    assert f"report: {tmp_path}/report.html" in capsys.readouterr().out


def test_loss_curves_are_both_visible():
    fig = loss_figure([{"step": 0, "loss_plus": 1.0, "loss_minus": 1.0, "projected_grad": 0.0}])
    plus = next(t for t in fig.data if t.name.startswith("l+"))
    minus = next(t for t in fig.data if t.name.startswith("l-"))
    assert fig.data.index(plus) > fig.data.index(minus) and plus.line.dash == "dash" and plus.opacity < 1


def test_an_exchange_is_drawn_once():
    spans = [Span(0, "compute", "forward", 0, 0, 0, 10), Span(0, "compute", "exchange", 0, -1, 10, 20),
             Span(0, "exchange", "exchange", 0, -1, 11, 19)]
    fig = timeline_figure(spans)
    bars = next(t for t in fig.data if t.name == "exchange")
    assert list(bars.y) == ["rank 0 · exchange"]
