"""ZO2's offloading (arXiv 2503.12668, Sec. 3.3-3.4): where the blocks live between visits (host
memory or a crash-safe disk store), the lanes that move them, and the assembly of a tier."""
