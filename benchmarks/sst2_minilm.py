"""SST-2 with the pretrained all-MiniLM-L6-v2: zero-shot start, ZO fine-tuning, first-order reference.

    python benchmarks/sst2_minilm.py [--data ../shared/data/sst2] [--quick] [--start zero-shot|probe]
                                     [--scale 20] [--steps 2000 --lr 5e-5 --eps 1e-3 --directions 1]
                                     [--freeze '*word_embeddings*'] [--select best|last]
                                     [--fo-steps 32 --fo-lr 5e-5] [--eval-examples 1000] [--eval-every 500]
                                     [--shots K] [--peft lora:R [--peft-lr 1e-3]]
                                     [--optimizer METHOD [METHOD ...]] [--json result.json] [--results [PATH]]

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

``--optimizer METHOD [METHOD ...]`` trains ZO once per method of the family instead of once, each
from the same start, batches and step seeds. A method is ``NAME[:LR][+PERTURBATION][+ESTIMATOR]``:
NAME one of sgd, momentum, adam, sign, conservative, hizoo (zo.optimizer); ``:LR`` its own learning
rate (default ``--lr``); ``+lowrank:R``, ``+sparse:F``, ``+gaussian`` or ``+rademacher`` its
zo.perturbation; ``+one-sided:K`` FZOO's estimator with K directions (``+two-point``, the default,
uses ``--directions``); e.g. ``--optimizer sgd adam:1e-5 hizoo sgd+lowrank:4 sgd+sparse:0.5``.
Every method runs on the zo2 block engine (its wall-clock includes compiling the noise kernel): the
table's engine column. Every
method is checked before any work; an unknown name is one error naming the field and the choices.
The table gives each method's dev accuracy, McNemar against the start, steps (the scored
checkpoint's of all), lr, forwards per step, training wall-clock and peak RSS (added), the
first-order reference as its last row; ``--results`` writes it as section sst2_minilm_methods.
``--optimizer`` and ``--peft`` run one at a time.
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
    methods = any(a == "--optimizer" or a.startswith("--optimizer=") for a in argv)
    section = "sst2_minilm_methods" if methods else "sst2_minilm_lora" if "--peft" in argv else "sst2_minilm"
    with printed_to_results(section, r.results):
        code = main(argv)
    sys.exit(code)
