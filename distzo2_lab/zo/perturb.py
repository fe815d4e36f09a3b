"""Seeded perturber: the noise z of a MeZO step as a pure function, never stored.

MeZO (arXiv 2305.17333, Alg. 1) regenerates z from the step seed instead of keeping it. Here z
of a flat parameter bucket is cut into fixed-size chunks; chunk c of bucket `key` at step seed s
is drawn from its own generator seeded with hash(s, key, c). So any chunk-aligned slice can be
regenerated without generating the rest (what the slicer of DistZO2 Sec. 3.3 needs), no global
RNG state is read or changed, and chunks are filled in parallel by a small thread pool (torch
kernels release the GIL; CPU ``normal_`` is single-threaded).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from distzo2_lab.config import NOISE_KINDS, ConfigError
from distzo2_lab.seeds import derive_seed


def frozen_spans(buckets, patterns) -> dict[str, list[tuple[int, int]]]:
    """{bucket key: merged [start, stop) spans} of the parameters whose names match a glob pattern."""
    import fnmatch

    from distzo2_lab.models.buckets import _merge  # slots are in order and contiguous: touching spans join

    out: dict[str, list[tuple[int, int]]] = {}
    used = set()
    for b in buckets:
        spans = []
        for s in b.slots:
            hit = [p for p in patterns if fnmatch.fnmatchcase(s.name, p)]
            used.update(hit)
            if hit:
                spans.append((s.start, s.stop))
        if spans:
            out[b.key] = _merge(spans)
    unused = [p for p in patterns if p not in used]
    if unused:
        names = [s.name for b in buckets for s in b.slots]
        raise ConfigError(f"zo.freeze pattern {unused[0]!r} matches no parameter; names look like "
                          f"{', '.join(names[:3])}, ... (glob patterns, e.g. '*word_embeddings*')")
    return out


def _subtract(span: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    a, b = span
    out = []
    for h0, h1 in holes:
        if h1 <= a or h0 >= b:
            continue
        if h0 > a:
            out.append((a, h0))
        a = max(a, h1)
    if a < b:
        out.append((a, b))
    return out


class Perturber:
    """Fills buffers with z(seed, key)[start:stop] for Gaussian or Rademacher noise."""

    def __init__(self, noise: str = "gaussian", chunk_size: int = 1 << 20, threads: int = 1):
        if noise not in NOISE_KINDS:
            raise ConfigError(f"noise={noise!r} is not valid; choose one of {', '.join(NOISE_KINDS)}")
        if chunk_size <= 0:
            raise ConfigError(f"chunk_size={chunk_size!r} is not valid; it must be a positive integer")
        self.noise = noise
        self.chunk_size = int(chunk_size)
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, "zo-noise") if self.threads > 1 else None
        self._local = threading.local()
        self.frozen: dict[str, list[tuple[int, int]]] = {}  # bucket key -> spans where z is 0 (zo.freeze)
        self._decay: dict[str, list[tuple[int, int]]] = {}  # frozen buckets' decay spans without the frozen

    def freeze(self, buckets, patterns) -> Perturber:
        """Hold the parameters whose names match any of the glob `patterns` fixed (zo.freeze): their
        z is 0 wherever it is drawn, so no pass perturbs them and no update (or its replay) moves
        them. Refuses a pattern that matches no parameter."""
        self.frozen = frozen_spans(buckets, patterns)
        self._decay = {b.key: [piece for a, e in b.decay_spans for piece in _subtract((a, e), self.frozen[b.key])]
                       for b in buckets if b.key in self.frozen}
        return self

    def decay_spans(self, bucket) -> list[tuple[int, int]]:
        """The bucket's weight-decay spans without its frozen ones (computed once by :meth:`freeze`)."""
        return self._decay.get(bucket.key, bucket.decay_spans)

    def _generator(self, device: torch.device) -> torch.Generator:
        """This thread's generator for `device`, made once and re-seeded for every chunk (re-seeding
        restarts the stream, so a chunk's values do not depend on the generator's history)."""
        gens = getattr(self._local, "gens", None)
        if gens is None:
            gens = self._local.gens = {}
        gen = gens.get(device)
        if gen is None:
            gen = gens[device] = torch.Generator(device=device)
        return gen

    def _fill_chunk(self, out: torch.Tensor, seed: int) -> None:
        gen = self._generator(out.device)
        gen.manual_seed(seed)
        if self.noise == "gaussian":
            out.normal_(generator=gen)
        else:  # rademacher: 0/1 bits mapped to -1/+1
            out.random_(0, 2, generator=gen).mul_(2).sub_(1)

    def fill(self, out: torch.Tensor, seed: int, key: str, start: int = 0, total: int | None = None) -> torch.Tensor:
        """Write z(seed, key)[start : start + out.numel()] into the flat tensor `out`.

        `start` must be chunk-aligned, and the slice must end on a chunk boundary or at the end of
        the bucket: a chunk's values depend on its length (CPU ``normal_`` treats its tail
        specially), so a bucket of `total` elements has a short last chunk. Pass `total` to have
        the end checked.
        """
        if out.dim() != 1 or not out.is_contiguous():
            raise ValueError("Perturber.fill needs a flat contiguous buffer")
        if start % self.chunk_size:
            raise ValueError(f"start={start} is not aligned to chunk_size={self.chunk_size}")
        stop = start + out.numel()
        if total is not None and stop != total and stop % self.chunk_size:
            raise ValueError(f"slice end {stop} is neither chunk-aligned (chunk_size={self.chunk_size}) "
                             f"nor the bucket end {total}")
        n, c0 = out.numel(), start // self.chunk_size
        jobs = [
            (out[i : i + self.chunk_size], derive_seed(seed, key, c0 + i // self.chunk_size))
            for i in range(0, n, self.chunk_size)
        ]
        if self._pool is None or len(jobs) == 1 or out.is_cuda:  # CUDA: queued on one stream, no threads
            for buf, s in jobs:
                self._fill_chunk(buf, s)
        else:
            for f in [self._pool.submit(self._fill_chunk, buf, s) for buf, s in jobs]:
                f.result()
        for a, b in self.frozen.get(key, ()):
            if a < stop and b > start:
                out[max(a, start) - start : min(b, stop) - start].zero_()
        return out

    def noise_for(self, seed: int, key: str, numel: int, start: int = 0, device="cpu",
                  total: int | None = None) -> torch.Tensor:
        """A fresh buffer holding z(seed, key)[start : start + numel] (fp32)."""
        return self.fill(torch.empty(numel, dtype=torch.float32, device=device), seed, key, start, total)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
