"""Seeded perturber: the noise z of a MeZO step as a pure function, never stored.

MeZO (arXiv 2305.17333, Alg. 1) regenerates z from the step seed instead of keeping it. Here
element i of bucket `key` at step seed s is the counter-based function of :mod:`noise` (a hash
of (s, key, i) turned into a Gaussian or a sign), so any slice at any start regenerates alone
(what the slicer of DistZO2 Sec. 3.3 needs), the values are the same on CPU and GPU, and no
generator state exists anywhere. The perturber adds what the model's buckets need on top: the
frozen spans (zo.freeze), where z is 0, and the weight-decay spans without them.
"""
from __future__ import annotations

import torch

from distzo2_lab.config import NOISE_KINDS, ConfigError
from distzo2_lab.zo import noise


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


def subtract(span: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [a, b) = `span` outside the sorted, disjoint `holes`."""
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
    """Fills buffers with z(seed, key)[start : start + n] for Gaussian or Rademacher noise."""

    def __init__(self, noise_kind: str = "gaussian"):
        if noise_kind not in NOISE_KINDS:
            raise ConfigError(f"noise={noise_kind!r} is not valid; choose one of {', '.join(NOISE_KINDS)}")
        self.noise = noise_kind
        self.frozen: dict[str, list[tuple[int, int]]] = {}  # bucket key -> spans where z is 0 (zo.freeze)
        self._decay: dict[str, list[tuple[int, int]]] = {}  # frozen buckets' decay spans without the frozen

    def freeze(self, buckets, patterns) -> Perturber:
        """Hold the parameters whose names match any of the glob `patterns` fixed (zo.freeze): their
        z is 0 wherever it is drawn, so no pass perturbs them and no update (or its replay) moves
        them. Refuses a pattern that matches no parameter."""
        self.frozen = frozen_spans(buckets, patterns)
        self._decay = {b.key: [piece for a, e in b.decay_spans for piece in subtract((a, e), self.frozen[b.key])]
                       for b in buckets if b.key in self.frozen}
        return self

    def decay_spans(self, bucket) -> list[tuple[int, int]]:
        """The bucket's weight-decay spans without its frozen ones (computed once by :meth:`freeze`)."""
        return self._decay.get(bucket.key, bucket.decay_spans)

    def fill(self, out: torch.Tensor, seed: int, key: str, start: int = 0) -> torch.Tensor:
        """Write z(seed, key)[start : start + out.numel()] into the flat fp32 tensor `out`."""
        if out.dim() != 1 or not out.is_contiguous():
            raise ValueError("Perturber.fill needs a flat contiguous buffer")
        noise.fill_(out, self.noise, noise.noise_key(seed, key), start)
        stop = start + out.numel()
        for a, b in self.frozen.get(key, ()):
            if a < stop and b > start:
                out[max(a, start) - start : min(b, stop) - start].zero_()
        return out

    def by_slab(self, master: torch.Tensor, seed: int, key: str, buf: torch.Tensor, fn) -> None:
        """fn(master slice, z slice, offset) over a whole bucket's `master`, in slices as long as `buf`,
        z(seed, key) of each regenerated into `buf` (no bucket-sized z: the same bits as one fill)."""
        slab = buf.numel()
        for a in range(0, master.numel(), slab):
            z = self.fill(buf[: min(slab, master.numel() - a)], seed, key, start=a)
            fn(master[a : a + z.numel()], z, a)

    def noise_for(self, seed: int, key: str, numel: int, start: int = 0, device="cpu") -> torch.Tensor:
        """A fresh buffer holding z(seed, key)[start : start + numel] (fp32)."""
        return self.fill(torch.empty(numel, dtype=torch.float32, device=device), seed, key, start)


    def visit(self, bucket, master: torch.Tensor, terms=(), keep: float = 1.0, seed: int | None = None,
              eps: float = 0.0, plus: torch.Tensor | None = None, minus: torch.Tensor | None = None,
              start: int = 0) -> None:
        """One fused pass over `master`, elements [start, start + n) of `bucket` (noise.visit_):

            m = master * keep (on the decay spans) + sum of alpha * z(term seed);  master[:] = m
            plus = m + eps z(seed);  minus = m - eps z(seed)  (each in its own dtype, the compute dtype)

        `terms` are (seed, alpha) pairs (a pending update, see :func:`spsa.update_terms`); with `seed`
        None the outs are plain copies of m. z is 0 on the frozen spans, where nothing moves. A bf16
        master (precision.master='bf16') is rounded stochastically with noise keyed by the first
        term's seed (:func:`noise.round_bf16`), so a replay of the same terms rounds the same way."""
        stop = start + master.numel()
        frozen = self.frozen.get(bucket.key, ())
        decay = self.decay_spans(bucket) if keep != 1.0 else ()
        cuts = sorted({start, stop, *(e for a, b in (*frozen, *decay) for e in (a, b) if start < e < stop)})
        keys = [(noise.noise_key(s, bucket.key), alpha) for s, alpha in terms]
        cur = None if seed is None else noise.noise_key(seed, bucket.key)
        rk = noise.noise_key(terms[0][0], "round/" + bucket.key) if terms and master.dtype != torch.float32 else None
        for a, b in zip(cuts, cuts[1:]):
            still = any(f0 <= a and b <= f1 for f0, f1 in frozen)
            if still and plus is None and minus is None:
                continue  # a frozen piece with no copy to write: nothing changes there
            k = keep if any(d0 <= a and b <= d1 for d0, d1 in decay) else 1.0
            i, j = a - start, b - start
            noise.visit_(master[i:j], a, self.noise, [] if still else keys, k, None if still else cur, eps,
                         None if plus is None else plus[i:j], None if minus is None else minus[i:j], rk)
