"""SST-2 with the pretrained all-MiniLM-L6-v2: zero-shot start, ZO fine-tuning, first-order reference.

    python benchmarks/sst2_minilm.py [--data ../shared/data/sst2] [--quick] [--start zero-shot|probe]
                                     [--scale 20] [--steps 2000 --lr 5e-5 --eps 1e-3 --directions 1]
                                     [--freeze '*word_embeddings*'] [--select best|last]
                                     [--fo-steps 32 --fo-lr 5e-5] [--eval-examples 1000] [--eval-every 500]
                                     [--shots K] [--peft lora:R [--peft-lr 1e-3]] [--json result.json]
                                     [--results [PATH]]

One process, one machine, side by side. The classifier reads the unit-length mean of the last
hidden states, as the model was trained (its sentence-transformers files say so; the adapter's
``classifier_pooling``). The start is a zero-shot head: its rows are the model's own embeddings of
"It was terrible." / "It was great." times ``--scale`` (no training example used); a linear probe
fitted on the 1000-example training sample (body frozen) is reported beside it
(``--start probe`` starts from the probe instead). The model is then fine-tuned from the start
by ZO through the real engine and ``train()`` (the word-embedding table held fixed by default,
``--freeze ''`` trains all of it) and, as the upper reference, by backprop + AdamW (all of it).
ZO's checkpoint with the best accuracy on the 500 validation examples is scored (MeZO's protocol;
``--select last`` scores the last). Accuracy is measured on the same seeded sample of dev.tsv,
each gain with McNemar's exact paired test against the start; peak memory of each training
phase is the process's resident-set high-water mark, reset before the phase. ``--quick`` is a
seconds-sized smoke run (k = 16, a handful of steps): its accuracies mean nothing.

``--peft lora:R`` runs both methods side by side in one invocation: after full-parameter ZO, ZO
trains only ``peft`` LoRA adapters of rank R (the base held fixed) from the same start, batches
and step seeds, at ``--peft-lr`` (default ``--lr``). A table of both follows: dev accuracy,
McNemar against the start and LoRA against full ZO, steps, ZO wall-clock, peak RSS and the bytes
the engine moved per step; ``--results`` writes it as section sst2_minilm_lora (sst2_minilm
without ``--peft``).
"""
from __future__ import annotations

import argparse
import os
import sys

from distzo2_lab.bench.results import add_results_option, printed_to_results
from distzo2_lab.bench.sst2 import main

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2")

if __name__ == "__main__":
    results = argparse.ArgumentParser(add_help=False)
    add_results_option(results)
    r, argv = results.parse_known_args(sys.argv[1:])
    if "--data" not in argv:
        argv = ["--data", os.environ.get("DISTZO2_SST2_DIR", SHARED), *argv]
    with printed_to_results("sst2_minilm_lora" if "--peft" in argv else "sst2_minilm", r.results):
        code = main(argv)
    sys.exit(code)
