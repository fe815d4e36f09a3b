import os

import pytest
import torch

from distzo2_lab.config import ConfigError, TrainConfig, replace
from distzo2_lab.data.tasks import ByteTokenizer, SyntheticTask, TextTask, read_text
from distzo2_lab.run.train import train

# The shared SST-2 copy sits beside the checkout (../shared); DISTZO2_SST2_DIR points elsewhere.
SST2 = os.path.join(os.environ.get("DISTZO2_SST2_DIR", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                     "shared", "data", "sst2")), "train.tsv")


def test_synthetic_batches_are_pure_functions_of_seed_and_step():
    t = SyntheticTask(512, 16, 4, seed=3)
    assert torch.equal(t.batch(5)["input_ids"], SyntheticTask(512, 16, 4, seed=3).batch(5)["input_ids"])
    assert not torch.equal(t.batch(5)["input_ids"], t.batch(6)["input_ids"])
    ids = t.batch(0)["input_ids"]
    assert ids.shape == (4, 16) and ((ids[:, 1:] - 4) == (ids[:, :-1] - 4 + 1) % 16).all()


def test_synthetic_loss_clearly_falls_within_300_zo_steps():
    s = train(TrainConfig(steps=300), progress=False)
    assert s["eval_loss_end"] < s["eval_loss_start"] - 1.5, (s["eval_loss_start"], s["eval_loss_end"])


def test_text_and_tsv_files_train_a_causal_lm(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("zeroth-order fine-tuning needs only forward passes. " * 20)
    tsv = tmp_path / "b.tsv"
    tsv.write_text("sentence\tlabel\n" + "it was great\t1\nit was terrible\t0\n" * 10)
    assert "sentence" not in read_text(str(tsv)) and "\t" not in read_text(str(tsv))
    task = TextTask(str(txt), ByteTokenizer(), 16, 4, seed=0)
    assert task.batch(0)["input_ids"].shape == (4, 16)
    for path in (txt, tsv):
        s = train(TrainConfig(steps=3, task="text", data=str(path), seq_len=16, batch_size=2), progress=False)
        assert len(s["steps"]) == 3


@pytest.mark.skipif(not os.path.exists(SST2), reason="shared SST-2 data not present")
def test_sst2_sentences_as_language_modelling_text():
    task = TextTask(SST2, ByteTokenizer(), 64, 4, seed=0, vocab_size=512)
    assert task.windows.shape[0] > 100


def test_empty_or_missing_data_fails_with_the_file_name(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="empty.txt.*holds no text"):
        train(TrainConfig(steps=1, task="text", data=str(empty)), progress=False)
    with pytest.raises(ConfigError, match="nope.txt.*does not exist"):
        train(TrainConfig(steps=1, task="text", data=str(tmp_path / "nope.txt")), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="fewer than one window"):
        train(TrainConfig(steps=1, task="text", data=str(short)), progress=False)
    with pytest.raises(ConfigError, match="task='text' needs data"):
        replace(TrainConfig(), task="text")
