"""The ZO step (MeZO, arXiv 2305.17333; ZO2, arXiv 2503.12668 Sec. 3.2): the seeded noise, the SPSA
arithmetic, the eager MeZO reference (the oracle) and the block engine with its deferred update."""
