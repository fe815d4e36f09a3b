import json
import os
import subprocess
import sys

import pytest

from distzo2_lab.cli.main import DEFAULT_LR, default_lr, main


def test_train_writes_the_summary_with_per_step_records_and_digest(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny", "--steps", "3", "--seed", "4", "--lr", "1e-3", "--eps", "1e-3",
               "--batch-size", "2", "--seq-len", "16", "--precision", "fp32", "--engine", "zo2",
               "--out", str(out), "--save", str(tmp_path / "ck"), "--no-progress"])
    assert rc == 0
    s = json.load(open(out / "summary.json"))
    assert [r["step"] for r in s["steps"]] == [0, 1, 2]
    for r in s["steps"]:
        assert set(r) >= {"step", "seed", "loss_plus", "loss_minus", "projected_grad"}
        assert r["projected_grad"] == pytest.approx((r["loss_plus"] - r["loss_minus"]) / 2e-3)
    assert len(s["digest"]) == 64 and s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0
    assert os.path.exists(tmp_path / "ck" / "model.safetensors")
    assert "summary in" in capsys.readouterr().out
    rc = main(["rebuild", str(out / "seedlog.jsonl"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["digest"] == s["digest"]


@pytest.mark.parametrize("args, message", [
    (["--model", "opt-9b"], "model='opt-9b' is not a preset"),
    (["--model", "./no/such/dir"], "checkpoint directory does not exist"),
    (["--eps", "0"], "zo.eps=0.0 is not valid"),
    (["--eps", "-1"], "zo.eps=-1.0 is not valid"),
    (["--seq-len", "4096"], "seq_len=4096 is longer than the model's max_position_embeddings=256"),
    (["--precision", "fp64"], "precision.compute='fp64' is not valid"),
    (["--task", "text"], "task='text' needs data"),
    (["--perturb", "both"], "zo.perturb='both' is not valid; choose one of auto, in-place, copy"),
    (["--perturb", "in-place", "--directions", "2"], "zo.perturb='in-place' with zo.directions=2"),
])
def test_bad_input_fails_with_one_clear_message(args, message, capsys, tmp_path):
    rc = main(["train", "--steps", "1", "--no-progress", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("distzo2: error:") and message in err


def test_perturb_and_freeze_flags_reach_the_config(tmp_path):
    common = ["train", "--steps", "2", "--batch-size", "2", "--seq-len", "12", "--threads", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--perturb", "in-place", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.load(open(tmp_path / d / "summary.json")) for d in "ab")
    assert a["config"]["zo"]["perturb"] == "copy" and b["config"]["zo"]["perturb"] == "in-place"  # auto: copies
    assert abs(a["steps"][0]["loss_plus"] - b["steps"][0]["loss_plus"]) < 1e-5 and a["digest"] != b["digest"]
    frozen = ["--freeze", "*embed_tokens*", "--freeze", "*embed_positions*"]
    assert main([*common, *frozen, "--out", str(tmp_path / "c")]) == 0
    c = json.load(open(tmp_path / "c" / "summary.json"))
    assert c["config"]["zo"]["freeze"] == ["*embed_tokens*", "*embed_positions*"]
    assert main([*common, "--freeze", "nothing", "--out", str(tmp_path / "d")]) == 2


def test_empty_data_file_fails_with_its_name(tmp_path, capsys):
    (tmp_path / "e.tsv").write_text("sentence\tlabel\n")
    rc = main(["train", "--task", "text", "--data", str(tmp_path / "e.tsv"), "--no-progress", "--out", str(tmp_path)])
    assert rc == 2 and "e.tsv" in capsys.readouterr().err


def test_bench_efficiency_json_reports_both_ratios(capsys):
    rc = main(["bench", "efficiency", "--model", "tiny", "--batch", "2", "--seq", "16", "--repeats", "1",
               "--threads", "1", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert r["engine_ratio"] == pytest.approx(r["engine_step_s"] / (2 * r["forward_s"]))
    assert r["eager_ratio"] == pytest.approx(r["eager_step_s"] / (2 * r["forward_s"]))


def test_console_script_runs_the_demo(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "distzo2")
    p = subprocess.run([exe, "demo", "--out", str(tmp_path / "demo"), "--steps", "40"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "bit-identical" in p.stdout and "matches training" in p.stdout
    for f in ("summary.json", "seedlog.jsonl", "loss.html", "checkpoint/model.safetensors"):
        assert os.path.exists(tmp_path / "demo" / f)


def test_bench_results_option_writes_its_section_of_the_results_page(tmp_path, capsys):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n<!-- results:offload -->\nkept\n<!-- /results:offload -->\n")
    rc = main(["bench", "efficiency", "--model", "tiny", "--batch", "2", "--seq", "16", "--repeats", "1",
               "--threads", "1", "--results", str(page)])
    assert rc == 0
    text = page.read_text()
    assert "<!-- results:efficiency -->" in text and "engine / floor" in text and "kept" in text
    assert "engine / floor" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", list(DEFAULT_LR))
def test_each_optimizer_lowers_the_tiny_loss_by_ten_percent_at_its_default_rate(optimizer, tmp_path, capsys):
    """`distzo2 train --model tiny --steps 300 --optimizer NAME`, nothing else: the rate chosen for
    the optimiser (said on stdout) brings the evaluation loss down by at least 10 %."""
    out = tmp_path / optimizer
    assert main(["train", "--model", "tiny", "--steps", "300", "--optimizer", optimizer, "--no-progress",
                 "--out", str(out)]) == 0
    lr, why = default_lr("tiny", optimizer)
    assert f"lr {lr:g} ({why}; --lr to change)" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_loss_end"] <= 0.9 * s["eval_loss_start"], s
