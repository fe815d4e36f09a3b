"""SST-2 with the pretrained all-MiniLM-L6-v2: linear-probe start, ZO fine-tuning, first-order reference.

    python benchmarks/sst2_minilm.py [--data ../shared/data/sst2] [--quick] [--steps 400 --lr 2e-5 --eps 1e-3]
                                     [--fo-steps 32 --fo-lr 5e-5] [--eval-examples 1000] [--eval-every 100]
                                     [--shots K] [--json result.json]

One process, one machine, side by side: the head is fitted by linear probing (body frozen) on the
1000-example training sample (MeZO's protocol), then the whole model is fine-tuned from there by
ZO through the real engine and ``train()`` and, as the upper reference, by backprop + AdamW.
Accuracy is measured on the same seeded sample of dev.tsv; peak memory of each training phase is
the process's resident-set high-water mark, reset before the phase. ``--quick`` is a seconds-sized
smoke run (k = 16, a handful of steps): its accuracies mean nothing.
"""
from __future__ import annotations

import os
import sys

from distzo2_lab.bench_sst2 import main

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--data" not in argv:
        argv = ["--data", os.environ.get("DISTZO2_SST2_DIR", SHARED), *argv]
    sys.exit(main(argv))
