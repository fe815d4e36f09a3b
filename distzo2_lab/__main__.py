"""`python -m distzo2_lab [train flags]`: one rank of a training run, for torchrun
(`torchrun --nproc-per-node 2 -m distzo2_lab --layout dp=1,pert=2`)."""
import sys

from distzo2_lab.cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
