"""DistZO2's parallelism (arXiv 2507.03211, Sec. 3): the layout, the process groups that one object
owns, the scalar exchange, the slicer, node-shared memory and the launcher of ranks."""
