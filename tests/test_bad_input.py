"""Bad input of every kind is refused before any work starts: exit status 2, one line on stderr
naming the field or the file and line, no traceback, and nothing already in --out touched."""
import json
import os
import subprocess
import sys

import pytest

from distzo2_lab.cli.main import main

EXE = os.path.join(os.path.dirname(sys.executable), "distzo2")
TRAIN = ["train", "--steps", "2", "--batch-size", "2", "--seq-len", "12", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real run's seed log and checkpoint, and damaged copies of them."""
    d = tmp_path_factory.mktemp("inputs")
    assert main([*TRAIN, "--out", str(d / "run"), "--save", str(d / "ck")]) == 0
    log = (d / "run" / "seedlog.jsonl").read_text().splitlines()
    (d / "not_a_log.md").write_text("# distzo2_lab\nA notebook-first toolkit\n")
    (d / "truncated.jsonl").write_text("\n".join(log[:2]) + "\n" + log[2][: len(log[2]) // 2])
    (d / "corrupted.jsonl").write_text("\n".join([log[0], "{\"step\": 0, \"seed\": ", log[2]]) + "\n")
    (d / "header.jsonl").write_text(json.dumps({"model": "tiny"}) + "\n")
    head = json.loads(log[0])  # a log of the chunked generators: no noise rule, a chunk size
    del head["noise"]
    head["zo"]["chunk_size"] = 1 << 20
    (d / "chunked.jsonl").write_text("\n".join([json.dumps(head), *log[1:]]) + "\n")
    head = json.loads(log[0])  # a log of the element-wise gaussian rule
    head["noise"] = "counter-1"
    (d / "counter1.jsonl").write_text("\n".join([json.dumps(head), *log[1:]]) + "\n")
    gap = json.loads(log[2])
    gap["step"] = 5
    (d / "gap.jsonl").write_text("\n".join([log[0], log[1], json.dumps(gap)]) + "\n")
    for name in ("ck_no_weights", "ck_bad_log", "ck_bad_state"):
        os.makedirs(d / name)
        for f in ("state.json", "seedlog.jsonl", "model.safetensors"):
            (d / name / f).write_bytes((d / "ck" / f).read_bytes())
    os.remove(d / "ck_no_weights" / "model.safetensors")
    (d / "ck_bad_log" / "seedlog.jsonl").write_text((d / "truncated.jsonl").read_text())
    (d / "ck_bad_state" / "state.json").write_text('{"step": 2, "config"')
    os.makedirs(d / "empty_dir")
    os.makedirs(d / "sst2")
    (d / "sst2" / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nno label here\n")
    os.makedirs(d / "boolq")
    (d / "boolq" / "train.jsonl").write_text('{"question": "is it", "passage": "it is", "label": true}\n{"question"\n')
    (d / "a_file").write_text("x")
    return d


# (what, argv with {d} for the inputs directory, text the one line must hold)
CASES = [
    ("slice without offload tier", [*TRAIN, "--layout", "dp=1,pert=2", "--slice"], "--offload host"),
    ("slice without layout", [*TRAIN, "--slice"], "--slice cuts blocks"),
    ("layout not dp/pert", [*TRAIN, "--layout", "tp=2"], "write it as dp=D,pert=P"),
    ("layout not a number", [*TRAIN, "--layout", "dp=x,pert=2"], "write it as dp=D,pert=P"),
    ("layout pert 3", [*TRAIN, "--layout", "dp=1,pert=3"], "pert=3 is not valid"),
    ("layout not dividing batch", [*TRAIN, "--layout", "dp=3,pert=1", "--batch-size", "8"],
     "batch_size=8 cannot be split over dp=3"),
    ("directions vs pert", [*TRAIN, "--layout", "dp=1,pert=4", "--directions", "1"], "pert=4 does not fit"),
    ("world size vs layout", [*TRAIN, "--layout", "dp=2,pert=2", "--world-size", "3"], "world_size=3"),
    ("save with a layout", [*TRAIN, "--layout", "dp=1,pert=2", "--save", "{d}/s"], "single-rank"),
    ("unknown model", [*TRAIN, "--model", "opt-9b"], "model='opt-9b' is not a preset"),
    ("missing model directory", [*TRAIN, "--model", "./no/such/dir"], "checkpoint directory does not exist"),
    ("model directory without config", [*TRAIN, "--model", "{d}/empty_dir"], "has no config.json"),
    ("zero steps", [*TRAIN, "--steps", "0"], "steps=0 is not valid"),
    ("negative steps", [*TRAIN, "--steps", "-5"], "steps=-5 is not valid"),
    ("zero lr", [*TRAIN, "--lr", "0"], "zo.lr=0.0 is not valid"),
    ("negative lr", [*TRAIN, "--lr=-1e-3"], "zo.lr=-0.001 is not valid"),
    ("nan lr", [*TRAIN, "--lr", "nan"], "zo.lr=nan is not valid"),
    ("zero eps", [*TRAIN, "--eps", "0"], "zo.eps=0.0 is not valid"),
    ("bad noise", [*TRAIN, "--noise", "uniform"], "zo.noise='uniform' is not valid; choose one of"),
    ("bad optimizer", [*TRAIN, "--optimizer", "lion"], "zo.optimizer='lion' is not valid; choose one of sgd, momentum"),
    ("bad perturbation", [*TRAIN, "--perturbation", "lowrank:0"], "zo.perturbation='lowrank:0' is not valid"),
    ("bad estimator", [*TRAIN, "--estimator", "three-point"], "zo.estimator='three-point' is not valid"),
    ("family on a lean disk tier", [*TRAIN, "--optimizer", "adam", "--offload", "disk", "--store", "{d}/s",
                                    "--lean"], "the method family (zo.optimizer='adam'"),
    ("hizoo one-sided", [*TRAIN, "--engine", "eager", "--optimizer", "hizoo", "--estimator", "one-sided",
                         "--directions", "2"], "zo.optimizer='hizoo' estimates the Hessian"),
    ("one-sided one direction", [*TRAIN, "--engine", "eager", "--estimator", "one-sided"], "choose zo.directions >= 2"),
    ("perturbation against noise", [*TRAIN, "--engine", "eager", "--perturbation", "rademacher", "--noise",
                                    "gaussian"], "a dense perturbation is the noise itself"),
    ("bad precision", [*TRAIN, "--precision", "fp64"], "precision.compute='fp64' is not valid"),
    ("bad storage", [*TRAIN, "--storage", "int8"], "precision.storage='int8' is not valid"),
    ("storage without master", [*TRAIN, "--precision", "bf16", "--storage", "bf16", "--master", "none"],
     "would silently lose"),
    ("bf16 master without bf16 storage", [*TRAIN, "--master", "bf16"], "precision.master='bf16' is the bf16 weights"),
    ("bf16 master on the disk tier", [*TRAIN, "--precision", "bf16", "--storage", "bf16", "--master", "bf16",
                                      "--offload", "disk", "--store", "{d}/s"], "the disk store's crash-safe slots"),
    ("bad engine", [*TRAIN, "--engine", "adam"], "engine='adam' is not valid; choose one of zo2, eager"),
    ("bad task", [*TRAIN, "--task", "mnli"], "task='mnli' is not valid"),
    ("bad tier", [*TRAIN, "--offload", "nvme"], "offload.tier='nvme' is not valid"),
    ("disk tier without store", [*TRAIN, "--offload", "disk"], "needs offload.store"),
    ("store that is a file", [*TRAIN, "--offload", "disk", "--store", "{d}/a_file"], "is a file"),
    ("negative prefetch", [*TRAIN, "--offload", "host", "--prefetch", "-1"], "offload.prefetch=-1 is not valid"),
    ("micro-batches not dividing", [*TRAIN, "--batch-size", "8", "--micro-batches", "3"],
     "micro_batches=3 does not divide batch_size=8"),
    ("zero threads", [*TRAIN, "--threads", "0"], "threads=0 is not valid"),
    ("bad device", [*TRAIN, "--device", "tpu"], "device='tpu' is not valid"),
    ("seq len beyond positions", [*TRAIN, "--seq-len", "4096"], "max_position_embeddings=256"),
    ("text task without data", [*TRAIN, "--task", "text"], "task='text' needs data"),
    ("missing data file", [*TRAIN, "--task", "text", "--data", "{d}/none.txt"], "file does not exist"),
    ("malformed TSV", [*TRAIN, "--task", "sst2", "--data", "{d}/sst2"], "train.tsv: line 3"),
    ("malformed JSONL", [*TRAIN, "--task", "boolq", "--data", "{d}/boolq"], "train.jsonl: line 2: not a JSON"),
    ("data for synthetic", [*TRAIN, "--data", "{d}/a_file"], "only read by task='text' or a suite task"),
    ("shots without sst2", [*TRAIN, "--shots", "4"], "shots=4 is only read by task='sst2'"),
    ("out under a file", [*TRAIN, "--out", "{d}/a_file/sub"], "is not writable"),
    ("out is a file", [*TRAIN, "--out", "{d}/a_file"], "is a file, not a directory"),
    ("unwritable out", [*TRAIN, "--out", "/proc/distzo2"], "is not writable"),
    ("save under a file", [*TRAIN, "--save", "{d}/a_file/ck"], "save="),
    ("resume of a missing dir", [*TRAIN, "--resume", "{d}/nothing"], "does not exist"),
    ("resume of a dir without state", [*TRAIN, "--resume", "{d}/empty_dir"], "has no state.json"),
    ("resume of a checkpoint without weights", [*TRAIN, "--resume", "{d}/ck_no_weights"], "no model.safetensors"),
    ("resume of a truncated seed log", [*TRAIN, "--resume", "{d}/ck_bad_log"], "seedlog.jsonl: line 3: truncated"),
    ("resume of a damaged state", [*TRAIN, "--resume", "{d}/ck_bad_state"], "state.json: line 1: not JSON"),
    ("freeze matching nothing", [*TRAIN, "--freeze", "nothing*"], "nothing*"),
    ("rebuild of a non-seed-log", ["rebuild", "{d}/not_a_log.md"], "not_a_log.md: line 1: not JSON"),
    ("rebuild of a truncated seed log", ["rebuild", "{d}/truncated.jsonl"], "truncated.jsonl: line 3: truncated"),
    ("rebuild of a corrupted seed log", ["rebuild", "{d}/corrupted.jsonl"], "corrupted.jsonl: line 2"),
    ("rebuild of a headerless log", ["rebuild", "{d}/header.jsonl"], "not a seed log header"),
    ("rebuild of a chunked-noise log", ["rebuild", "{d}/chunked.jsonl"],
     "chunked.jsonl: line 1: this seed log's noise rule is 'the chunked generators of earlier versions'"),
    ("rebuild of an element-wise gaussian log", ["rebuild", "{d}/counter1.jsonl"],
     "counter1.jsonl: line 1: this seed log's noise rule is 'counter-1', not 'counter-2'"),
    ("rebuild of a log with a gap", ["rebuild", "{d}/gap.jsonl"], "step 5 follows step 0"),
    ("rebuild of a missing file", ["rebuild", "{d}/none.jsonl"], "does not exist"),
]


def _argv(argv, d, out):
    argv = [a.replace("{d}", str(d)) for a in argv]
    return argv if argv[0] != "train" or "--out" in argv else [*argv, "--out", str(out)]


def _keeps(out) -> None:
    assert sorted(os.listdir(out)) == ["finished.txt"] and (out / "finished.txt").read_text() == "done work"


@pytest.mark.parametrize("what, argv, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(what, argv, text, files, tmp_path, capsys):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "finished.txt").write_text("done work")
    rc = main(_argv(argv, files, out))
    err = capsys.readouterr().err.strip()
    assert rc == 2, (what, err)
    assert err.startswith("distzo2: error:") and "\n" not in err, err
    assert text in err, err
    _keeps(out)


SUBPROCESS = ["slice without offload tier", "rebuild of a non-seed-log", "resume of a truncated seed log",
              "unwritable out", "unknown model"]


@pytest.mark.parametrize("what", SUBPROCESS)
def test_console_script_refuses_bad_input_without_a_traceback(what, files, tmp_path):
    _, argv, text = next(c for c in CASES if c[0] == what)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "finished.txt").write_text("done work")
    p = subprocess.run([EXE, *_argv(argv, files, out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1 and text in p.stderr
    assert "[rank" not in p.stdout  # refused before any worker started
    _keeps(out)


def test_case_table_covers_at_least_thirty_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("raw", ["0", "-5", "many"])
def test_a_bad_share_grain_is_one_clear_line(raw, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DISTZO2_SHARE_GRAIN", raw)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "finished.txt").write_text("done work")
    assert main([*TRAIN, "--layout", "dp=2", "--dry-run", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"distzo2: error: DISTZO2_SHARE_GRAIN={raw!r} is not valid; it must be a positive integer (elements)"
    _keeps(out)
