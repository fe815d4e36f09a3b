"""MeZO's task suite from its published formats: readers, prompts, metrics, sampling, scoring, CLI."""
import json
import os

import pytest
import torch

from distzo2_lab.cli.main import main
from distzo2_lab.config import ConfigError, TrainConfig, replace
from distzo2_lab.data.formats import Record, read_jsonl, read_squad, read_tsv
from distzo2_lab.data.metrics import exact_match, mean_loglik, normalize_answer, squad_scores, token_f1
from distzo2_lab.data.prompts import TEMPLATES
from distzo2_lab.data.suite import SPECS, PromptTask, encode_pairs, read_split, sample, split_file

pytestmark = pytest.mark.usefixtures("private_cache")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rte_tsv(n):
    lines = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(n):
        lab = "entailment" if i % 2 == 0 else "not_entailment"
        lines.append(f"{i}\tThe cat number {i} sat on the mat.\tA cat sat {'on' if i % 2 == 0 else 'under'} it.\t{lab}")
    return "\n".join(lines) + "\n"


def _squad(n, offset=0):
    qas = [{"question": f"Where did cat {i} sit?", "id": f"q{i + offset}",
            "answers": [{"text": "the mat", "answer_start": 12}, {"text": "mat", "answer_start": 16}]}
           for i in range(n)]
    return {"version": "1.1", "data": [{"title": "Cats_and_mats", "paragraphs": [
        {"context": "The cat sat on the mat all day.", "qas": qas}]}]}


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    """One directory per task holding its train and dev files in the published format."""
    root = tmp_path_factory.mktemp("suite")
    for name in SPECS:
        os.makedirs(root / name)
    (root / "rte" / "train.tsv").write_text(_rte_tsv(12))
    (root / "rte" / "dev.tsv").write_text(_rte_tsv(6))
    labels = ["entailment", "contradiction", "neutral"]
    for split, n in (("train", 12), ("val", 6)):
        _jsonl(root / "cb" / f"{split}.jsonl", [{"premise": f"It rained on day {i}.", "hypothesis": "It is wet.",
                                                  "label": labels[i % 3], "idx": i} for i in range(n)])
        _jsonl(root / "boolq" / f"{split}.jsonl", [{"question": f"is cat {i} black", "passage": "Cats are black.",
                                                     "label": i % 2 == 0, "idx": i} for i in range(n)])
        _jsonl(root / "wic" / f"{split}.jsonl", [{"word": "bank", "sentence1": "The river bank.",
                                                   "sentence2": f"The bank {i} lends.", "label": i % 2 == 1,
                                                   "idx": i} for i in range(n)])
        _jsonl(root / "copa" / f"{split}.jsonl", [{"premise": f"The man {i} fell.", "choice1": "He tripped.",
                                                    "choice2": "I laughed.", "question": ["cause", "effect"][i % 2],
                                                    "label": i % 2, "idx": i} for i in range(n)])
    (root / "squad" / "train-v1.1.json").write_text(json.dumps(_squad(8)))
    (root / "squad" / "dev-v1.1.json").write_text(json.dumps(_squad(3, offset=100)))
    return root


# -- readers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n,classes", [("rte", 12, 2), ("cb", 12, 3), ("boolq", 12, 2), ("wic", 12, 2),
                                            ("copa", 12, 2), ("squad", 8, 0)])
def test_each_reader_returns_the_fields_and_labels_of_its_format(name, n, classes, suite_dir):
    recs = read_split(name, str(suite_dir / name), "train")
    assert len(recs) == n and len(read_split(name, str(suite_dir / name), "dev")) in (6, 3)
    assert len({r.label for r in recs}) == max(classes, 1)
    if name == "squad":
        assert recs[0].answers == ("the mat", "mat") and recs[0]["title"] == "Cats and mats"
        assert recs[0]["id"] == "q0" and recs[0]["question"] == "Where did cat 0 sit?"


def test_labels_map_to_mezo_class_order(suite_dir):
    rte = read_split("rte", str(suite_dir / "rte"), "train")
    assert [r.label for r in rte[:2]] == [0, 1]  # entailment, not_entailment
    cb = read_split("cb", str(suite_dir / "cb"), "train")
    assert [r.label for r in cb[:3]] == [0, 1, 2]  # entailment, contradiction, neutral
    boolq = read_split("boolq", str(suite_dir / "boolq"), "train")
    assert [r.label for r in boolq[:2]] == [1, 0]  # true, false
    assert [r.label for r in read_split("copa", str(suite_dir / "copa"), "train")[:2]] == [0, 1]


def test_malformed_input_is_refused_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "label": true}\n{"question": "q", "pass\n')
    with pytest.raises(ConfigError, match=r"train.jsonl: line 2: not a JSON object"):
        read_jsonl(str(bad), ("question", "passage"), {"false": 0, "true": 1})
    bad.write_text('{"question": "q", "label": true}\n')
    with pytest.raises(ConfigError, match=r"train.jsonl: line 1: missing field\(s\) passage"):
        read_jsonl(str(bad), ("question", "passage"), {"false": 0, "true": 1})
    bad.write_text('\n{"premise": "p", "hypothesis": "h", "label": "maybe"}\n')
    with pytest.raises(ConfigError, match=r"train.jsonl: line 2: label 'maybe' is not valid; choose one of "
                                          r"entailment, contradiction, neutral"):
        read_jsonl(str(bad), ("premise", "hypothesis"), {"entailment": 0, "contradiction": 1, "neutral": 2})
    bad.write_text('{"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}\n')
    with pytest.raises(ConfigError, match=r"line 1: question 'why' is not valid; choose one of cause, effect"):
        read_jsonl(str(bad), ("premise", "choice1", "choice2", "question"), {"0": 0, "1": 1},
                   {"question": ("cause", "effect")})
    tsv = tmp_path / "train.tsv"
    tsv.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(ConfigError, match=r"train.tsv: line 3: 3 tab-separated fields, the header has 4"):
        read_tsv(str(tsv), ("sentence1", "sentence2"), {"entailment": 0, "not_entailment": 1})
    tsv.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tcontradiction\n")
    with pytest.raises(ConfigError, match=r"train.tsv: line 2: label 'contradiction' is not valid"):
        read_tsv(str(tsv), ("sentence1", "sentence2"), {"entailment": 0, "not_entailment": 1})
    tsv.write_text("index\tsentence1\tlabel\n")
    with pytest.raises(ConfigError, match=r"train.tsv: line 1: header .* lacks the column\(s\) sentence2"):
        read_tsv(str(tsv), ("sentence1", "sentence2"), {"entailment": 0})
    with pytest.raises(ConfigError, match=r"nope.jsonl: file does not exist"):
        read_jsonl(str(tmp_path / "nope.jsonl"), ("q",), {})


def test_squad_errors_name_the_json_path(tmp_path):
    doc = _squad(2)
    del doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"]
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"dev-v1.1.json: \$.data\[0\].paragraphs\[0\].qas\[1\].answers\[0\]: "
                                          r"missing field 'answer_start'"):
        read_squad(str(path))
    path.write_text('{"data": [\n{"title": "x",}]}')
    with pytest.raises(ConfigError, match=r"dev-v1.1.json: line 2: not valid JSON"):
        read_squad(str(path))


def test_missing_directory_file_and_split_are_refused(tmp_path, suite_dir):
    with pytest.raises(ConfigError, match=r"directory does not exist \(task='cb' reads train.jsonl, val.jsonl\)"):
        split_file("cb", str(tmp_path / "nope"), "train")
    with pytest.raises(ConfigError, match=r"has no val.jsonl \(task='wic', split='dev' reads it\)"):
        split_file("wic", str(tmp_path), "dev")
    with pytest.raises(ConfigError, match="split='test' is not valid for task='rte'; choose one of train, validation"):
        split_file("rte", str(suite_dir / "rte"), "test")


# -- prompts ------------------------------------------------------------------------------------
def test_templates_render_mezo_prompts_and_label_words():
    T = TEMPLATES
    rte = Record({"sentence1": "A cat sat.", "sentence2": "A cat is sitting."}, 0)
    assert T["rte"].text(rte) == 'A cat sat.\nDoes this mean that "A cat is sitting." is true? Yes or No?\nYes'
    cb = Record({"premise": "It rained.", "hypothesis": "It is wet."}, 2)
    assert T["cb"].text(cb) == 'Suppose It rained. Can we infer that "It is wet."? Yes, No, or Maybe?\nMaybe'
    boolq = Record({"question": "is the sky blue", "passage": "The sky is blue."}, 1)
    assert T["boolq"].text(boolq) == "The sky is blue. Is the sky blue? Yes"
    wic = Record({"word": "bank", "sentence1": "A river bank.", "sentence2": "A bank loan."}, 0)
    assert T["wic"].text(wic) == ('Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
                                  "A river bank.\nA bank loan.\nNo")
    copa = Record({"premise": "The man fell.", "choice1": "He tripped.", "choice2": "I laughed.",
                   "question": "cause"}, 0)
    assert T["copa"].prompt(copa) == "The man fell because"
    assert T["copa"].candidates(copa) == (" he tripped.", " I laughed.")
    effect = Record({**copa.fields, "question": "effect"}, 1)
    assert T["copa"].text(effect) == "The man fell so I laughed."
    squad = Record({"title": "Cats", "context": "The cat sat.", "question": "Who sat?", "id": "1"}, -1, ("The cat",))
    assert T["squad"].text(squad) == "Title: Cats\nContext: The cat sat.\nQuestion: Who sat?\nAnswer: The cat\n"
    assert T["sst2"].words == (" terrible", " great")


# -- metrics ------------------------------------------------------------------------------------
def test_squad_f1_and_exact_match_on_known_pairs():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1("dog", "cat") == 0.0 and token_f1("a", "the") == 1.0  # both empty after normalising
    s = squad_scores("on the mat", ("the mat", "a rug"))
    assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(2 / 3)
    assert squad_scores("mat", ("rug", "the mat")) == {"exact_match": 1.0, "f1": 1.0}


def test_mean_loglik_averages_the_labelled_tokens_only():
    logits = torch.zeros(2, 4, 3)  # (B, T, V)
    logits[0, 0, 1] = 5.0
    labels = torch.tensor([[-100, 1, -100, -100], [-100, 2, 0, 1]])
    got = mean_loglik(logits, labels)
    p = torch.log_softmax(torch.tensor([0.0, 5.0, 0.0]), 0)[1]
    assert torch.allclose(got, torch.stack([p, torch.log(torch.tensor(1 / 3))]))


# -- sampling and batches -----------------------------------------------------------------------
def test_sampling_is_seeded_disjoint_and_keeps_validation_for_small_files():
    recs = [Record({"x": str(i)}, i % 3) for i in range(250)]
    tr, va = sample("cb", recs, seed=1)
    assert len(va) == 100 and len(tr) == 150 and not {r["x"] for r in tr} & {r["x"] for r in va}
    assert sample("cb", recs, seed=1) == (tr, va) and sample("cb", recs, seed=2)[0] != tr
    tr, va = sample("cb", recs, seed=0, shots=4)
    assert [sum(r.label == c for r in tr) for c in range(3)] == [4, 4, 4] == [sum(r.label == c for r in va)
                                                                              for c in range(3)]
    big = [Record({"x": str(i)}, i % 2) for i in range(2000)]
    tr, va = sample("rte", big, seed=0)
    assert (len(tr), len(va)) == (1000, 500)
    with pytest.raises(ConfigError, match="shots=5 needs 10 examples of label 0"):
        sample("rte", big[:12], seed=0, shots=5)
    with pytest.raises(ConfigError, match="500 validation examples and at least one training example requested"):
        sample("rte", big[:100], seed=0)


def _tokenizer(name, suite_dir):
    from distzo2_lab.data.suite import tokenizer_for_task

    return tokenizer_for_task("tiny", name, str(suite_dir / name), 512)


def test_batches_are_pure_functions_of_seed_and_step(suite_dir):
    tok = _tokenizer("rte", suite_dir)
    t = PromptTask("rte", str(suite_dir / "rte"), tok, 64, 3, seed=2, shots=3)
    u = PromptTask("rte", str(suite_dir / "rte"), tok, 64, 3, seed=2, shots=3)
    assert all(torch.equal(t.batch(s)["input_ids"], u.batch(s)["input_ids"]) for s in (0, 5, 17))
    epoch = [r["sentence1"] for s in range(2) for r in t.rows(s)]  # 2 batches of 3 = one epoch of 6
    assert sorted(epoch) == sorted(r["sentence1"] for r in t.train)
    assert t.rows(10**9) == t.validation[:3]


def test_classification_prompt_labels_only_the_label_word(suite_dir):
    tok = _tokenizer("cb", suite_dir)
    t = PromptTask("cb", str(suite_dir / "cb"), tok, 64, 3, seed=0, shots=2)
    assert len(t.choices) == 3
    rows = t.rows(0)
    b = t.batch(0)
    for i, r in enumerate(rows):
        (pos,) = (b["labels"][i] != -100).nonzero()[:, 0].tolist()
        assert b["labels"][i, pos] == t.choices[r.label]
        assert tok.decode(b["input_ids"][i, : pos + 1]).endswith(TEMPLATES["cb"].text(r))


def test_squad_sequence_trains_on_the_answer_and_keeps_the_question_when_cut(suite_dir):
    tok = _tokenizer("squad", suite_dir)
    r = read_split("squad", str(suite_dir / "squad"), "train")[0]
    b = encode_pairs(tok, [(TEMPLATES["squad"].prompt(r), TEMPLATES["squad"].target(r))], 24)
    ids, labels = b["input_ids"][0], b["labels"][0]
    assert ids.shape[0] == 24
    assert tok.decode(ids[labels != -100]) == " the mat\n"
    assert tok.decode(ids).endswith("Question: Where did cat 0 sit?\nAnswer: the mat\n")


# -- scoring ------------------------------------------------------------------------------------
class _Scripted:
    """A stand-in causal LM: its logits favour the tokens of `liked`, or follow `script` after
    `start` tokens (greedy decoding)."""

    max_positions = 256

    def __init__(self, vocab, liked=(), script=(), start=0):
        self.vocab, self.liked, self.script, self.start = vocab, list(liked), list(script), start

    def forward(self, ids, mask=None):
        logits = torch.zeros(*ids.shape, self.vocab)  # (B, T, V)
        if self.liked:
            logits[..., self.liked] = 8.0
        if self.script:
            k = ids.shape[1] - self.start
            logits[:, -1, self.script[min(k, len(self.script) - 1)]] = 9.0
        return logits


def test_copa_scoring_picks_the_candidate_with_the_higher_likelihood(suite_dir):
    from distzo2_lab.data.scoring import choose

    tok = _tokenizer("copa", suite_dir)
    t = PromptTask("copa", str(suite_dir / "copa"), tok, 64, 2, seed=0, shots=2)
    recs = t.examples("dev")[:2]
    liked = tok(" i laughed.", add_special_tokens=False)["input_ids"] + tok(" I laughed.",
                                                                            add_special_tokens=False)["input_ids"]
    assert choose(_Scripted(len(tok), liked), t, recs, "cpu") == [1, 1]  # choice2 is " I laughed."
    liked = tok(" he tripped.", add_special_tokens=False)["input_ids"]
    assert choose(_Scripted(len(tok), liked), t, recs, "cpu") == [0, 0]


def test_greedy_answer_stops_at_the_newline(suite_dir):
    from distzo2_lab.data.scoring import generate

    tok = _tokenizer("squad", suite_dir)
    t = PromptTask("squad", str(suite_dir / "squad"), tok, 64, 2, seed=0, shots=2)
    prompt = TEMPLATES["squad"].prompt(t.examples("dev")[0])
    start = len(tok(prompt)["input_ids"])
    script = tok(" the mat\nTitle: more", add_special_tokens=False)["input_ids"]
    assert generate(_Scripted(len(tok), script=script, start=start), t, prompt, "cpu") == "the mat"
    assert generate(_Scripted(len(tok), script=script, start=start), t, prompt, "cpu", max_new=1) == "the"


@pytest.mark.parametrize("name", ["copa", "squad"])
def test_evaluation_of_a_real_model_counts_every_example(name, suite_dir):
    from distzo2_lab.data.scoring import evaluate
    from distzo2_lab.data.suite import task_for
    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny"})
    t = task_for(TrainConfig(task=name, data=str(suite_dir / name), shots=2, seq_len=64), a)
    assert a.choices is None  # a continuation's language-modelling loss
    r = evaluate(a, t, t.examples("dev"), batch_size=2, per_example=True, max_new=2)
    assert r["examples"] == len(r["hits"]) == len(t.examples("dev"))
    key = "f1" if name == "squad" else "accuracy"
    assert 0.0 <= r[key] <= 1.0


# -- config and runs ----------------------------------------------------------------------------
def test_config_lists_the_suite_and_needs_a_directory():
    with pytest.raises(ConfigError, match="task='mnli' is not valid; choose one of synthetic, text, sst2, rte, cb, "
                                          "boolq, wic, copa, squad"):
        replace(TrainConfig(), task="mnli")
    with pytest.raises(ConfigError, match="task='copa' needs data=DIR"):
        replace(TrainConfig(), task="copa")


def test_an_encoder_is_refused_for_a_prompt_task(suite_dir):
    from distzo2_lab.data.suite import task_for
    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny-bert"})
    with pytest.raises(ConfigError, match="task='rte' scores prompts with a causal LM"):
        task_for(TrainConfig(model="tiny-bert", task="rte", data=str(suite_dir / "rte"), shots=2), a)


@pytest.mark.parametrize("name", ["cb", "boolq", "wic", "copa", "squad"])
def test_every_suite_task_trains_a_step(name, suite_dir):
    from distzo2_lab.run.train import train

    s = train(TrainConfig(task=name, data=str(suite_dir / name), shots=2, steps=1, batch_size=2, seq_len=64,
                          threads=1), progress=False)
    assert len(s["steps"]) == 1 and s["eval_loss_end"] == s["eval_loss_end"]  # a finite loss


def test_cli_trains_rte_then_evaluates_the_checkpoint(suite_dir, tmp_path, capsys):
    data, ck = str(suite_dir / "rte"), str(tmp_path / "ck")
    assert main(["train", "--task", "rte", "--data", data, "--shots", "2", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--threads", "1", "--out", str(tmp_path / "run"), "--save", ck,
                 "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["task"] == "rte" and len(summary["steps"]) == 2
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ck, "--task", "rte", "--data", data, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["examples"] == 6 and r["correct"] == round(r["accuracy"] * 6) and r["task"] == "rte"
    assert main(["eval", "--checkpoint", ck, "--task", "cb", "--data", data]) == 2
    assert "trained on task='rte', not task='cb'" in capsys.readouterr().err
