"""A training run: the loop, checkpoints and the seed log, evaluation, and a launched rank's worker."""
