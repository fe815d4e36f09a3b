"""The (dp x pert) layout of DistZO2 (arXiv 2507.03211, Sec. 3): the grid and its validation.

Ranks form one grid of shape (dp, pert); groups.py cuts the process groups from it. Along
`pert` the ranks share a micro-batch and the step seed and split the perturbed passes (pert = 1:
both signs on one rank, ZO2's dual forward; pert = 2: +eps on one rank, -eps on the other). Going
beyond the paper, pert = 2m with q = zo.directions independent directions (n-SPSA, MeZO's
variant) gives pair i the directions j with j mod m == i: pert = 2q runs one (direction, sign) per
rank. Along `dp` they take different micro-batches. Only scalars cross ranks for the optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass

from distzo2_lab.config import ConfigError


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    """Data-parallel groups (different micro-batches, same seed)."""
    pert: int = 1
    """Ranks sharing one micro-batch: 1 (dual forward on one rank) or even (+eps / -eps pairs)."""
    slice: bool = False
    """Hardware-aware slicing: each rank moves one shard of every block, the ranks all-gather."""
    share_noise: bool = True
    """CPU noise: the ranks of a node that draw the same z split every draw (noise_share.py)."""

    @property
    def world_size(self) -> int:
        return self.dp * self.pert

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp index, pert index) of a global rank (row-major grid)."""
        return divmod(rank, self.pert)

    def signs(self, rank: int) -> tuple[bool, bool]:
        """(runs the +eps pass, runs the -eps pass) on this rank."""
        if self.pert == 1:
            return True, True
        p = self.coords(rank)[1]
        return p % 2 == 0, p % 2 == 1

    def directions(self, rank: int, total: int) -> list[int]:
        """The perturbation directions (of `total`, n-SPSA) this rank runs: pair i of pert = 2m
        takes the directions j with j mod m == i; pert = 1 runs them all."""
        if self.pert == 1:
            return list(range(total))
        pair, pairs = self.coords(rank)[1] // 2, self.pert // 2
        return [j for j in range(total) if j % pairs == pair]

    def describe(self) -> str:
        sliced = ", sliced" if self.slice else ""
        unshared = ", noise drawn by every rank" if not self.share_noise and self.world_size > 1 else ""
        return f"dp={self.dp} x pert={self.pert} ({self.world_size} ranks{sliced}{unshared})"


def parse_layout(text: str) -> Layout:
    """'dp=2,pert=2' -> Layout(2, 2)."""
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in ("dp", "pert") or not value.isdigit():
            raise ConfigError(f"layout={text!r} is not valid; write it as dp=D,pert=P (e.g. dp=2,pert=2)")
        fields[key] = int(value)
    return Layout(**fields)


def validate_layout(layout: Layout, world_size: int, batch_size: int, backend: str = "gloo",
                    gpus: int = 0, directions: int = 1, micro_batches: int = 1) -> Layout:
    """One clear error per bad case; returns the layout unchanged."""
    if layout.dp < 1 or layout.pert < 1:
        raise ConfigError(f"layout dp={layout.dp}, pert={layout.pert} is not valid; both must be >= 1")
    if layout.pert != 1 and layout.pert % 2:
        raise ConfigError(f"layout pert={layout.pert} is not valid; choose pert=1 (both signs on one rank, "
                          "ZO2's dual forward) or an even pert (+eps and -eps on the two ranks of each pair)")
    if layout.pert > 2 * directions or (layout.pert > 1 and directions % (layout.pert // 2)):
        raise ConfigError(f"layout pert={layout.pert} does not fit zo.directions={directions}: pert=2m splits the "
                          f"directions over m pairs, so m must divide zo.directions; choose pert in "
                          f"{', '.join(str(v) for v in _valid_perts(directions))} or zo.directions="
                          f"{layout.pert // 2} (n-SPSA)")
    if world_size != layout.world_size:
        raise ConfigError(f"world_size={world_size} is not dp x pert = {layout.dp} x {layout.pert} = "
                          f"{layout.world_size}; choose world_size={layout.world_size} or another layout")
    if batch_size % layout.dp:
        raise ConfigError(f"batch_size={batch_size} cannot be split over dp={layout.dp} groups; choose a "
                          f"batch_size that is a multiple of {layout.dp}")
    if (batch_size // layout.dp) % micro_batches:
        raise ConfigError(f"micro_batches={micro_batches} does not divide the {batch_size // layout.dp} rows of each "
                          f"of dp={layout.dp} groups; choose a batch_size that is a multiple of "
                          f"{layout.dp * micro_batches}")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend={backend!r} is not valid; choose one of gloo, nccl")
    if backend == "nccl" and gpus < world_size:
        raise ConfigError(f"backend='nccl' needs one GPU per rank: {world_size} ranks, {gpus} GPUs visible; "
                          "use backend='gloo' (several ranks may share a GPU or the CPU)")
    return layout


def _valid_perts(directions: int) -> list[int]:
    return [1] + [2 * m for m in range(1, directions + 1) if directions % m == 0]


def choose_backend(device: str, world_size: int, gpus: int) -> str:
    """nccl with one rank per GPU when there are enough GPUs; gloo on CPU or when ranks share a GPU."""
    if device == "cuda" and gpus >= world_size:
        return "nccl"
    return "gloo"

