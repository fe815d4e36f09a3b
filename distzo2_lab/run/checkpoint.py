"""Checkpoints and seed logs: a fine-tuning run as a base model plus one (seed, g, lr) per step.

MeZO (arXiv 2305.17333, Sec. 2.1) notes that a whole ZO run is recoverable from its seeds and
projected gradients. A checkpoint is a directory: ``model.safetensors`` (flushed fp32 masters),
``state.json`` (step, run config, where the base came from) and ``seedlog.jsonl``. Replaying the
log re-runs exactly the arithmetic of training (+eps, -2 eps, +eps, update) with z regenerated,
so the rebuilt weights are bit-identical, not merely close.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch
from safetensors.torch import load_file, save_file

from distzo2_lab.config import ConfigError, ZOConfig, copies_perturbation
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.zo.perturb import Perturber
from distzo2_lab.zo.spsa import PendingUpdate, apply_update_, perturb_


def digest(adapter: BlockAdapter, values=None) -> str:
    """sha256 of every unique parameter (fp32 bytes, canonical bucket order, names included).

    `values(bucket) -> flat fp32 tensor` supplies buckets whose values live in a store."""
    h = hashlib.sha256()
    for b in adapter.buckets:
        h.update(b.key.encode())
        for s in b.slots:
            h.update(s.name.encode())
        flat = b.master if b.master is not None else values(b)
        h.update(flat.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_tensors(adapter: BlockAdapter, values=None) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor of every unique parameter, as a checkpoint saves them.

    `values(bucket) -> flat fp32 tensor` supplies buckets whose values live in a store."""
    out: dict[str, torch.Tensor] = {}
    for b in adapter.buckets:
        out.update(b.state(None if b.master is not None else values(b)))
    return out


def load_weights(adapter: BlockAdapter, path: str) -> None:
    tensors = load_file(path)
    missing = [s.name for b in adapter.buckets for s in b.slots if s.name not in tensors]
    if missing:
        raise ConfigError(f"checkpoint {path!r} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for b in adapter.buckets:
        b.load(tensors)


class SeedLog:
    """Header (base model, ZO hyper-parameters) + one record per step, as JSON lines."""

    def __init__(self, base: dict, zo: ZOConfig, records: list[dict] | None = None):
        self.base, self.zo, self.records = base, zo, list(records or [])
        self._file = None

    def append(self, step: int, seed: int, grad: float, lr: float, terms: tuple = ()) -> None:
        rec = {"step": step, "seed": seed, "grad": grad, "lr": lr}
        if terms:  # n-SPSA: every direction's (seed, g)
            rec["terms"] = [list(t) for t in terms]
        self.records.append(rec)
        if self._file is not None:  # live log: the record is in the file before the step commits
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def keep_live(self, path: str) -> None:
        """Rewrite the log at `path` and keep appending each new record to it as it comes."""
        self.write(path)
        self._file = open(path, "a")

    def write(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({"base": self.base, "zo": asdict(self.zo)}) + "\n")
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def read(cls, path: str) -> SeedLog:
        if not os.path.isfile(path):
            raise ConfigError(f"seed log {path!r} does not exist")
        with open(path) as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
        if not lines or "base" not in lines[0]:
            raise ConfigError(f"seed log {path!r} has no header line")
        return cls(lines[0]["base"], ZOConfig(**lines[0]["zo"]), lines[1:])


@torch.no_grad()
def replay(adapter: BlockAdapter, log: SeedLog, threads: int = 1) -> None:
    """Apply every logged step to the adapter's weights (which must be the log's base)."""
    zo = log.zo
    perturber = Perturber(zo.noise, zo.chunk_size, threads).freeze(adapter.buckets, zo.freeze)
    round_trip = not copies_perturbation(zo)  # in place, the weights carry the round trip's rounding
    for b in adapter.buckets:
        z = torch.empty(b.numel, device=b.master.device)
        for r in log.records:
            p = PendingUpdate(r["step"], r["seed"], r["grad"], r["lr"], tuple(map(tuple, r.get("terms", ()))))
            if round_trip:
                perturber.fill(z, r["seed"], b.key)
                for scale in (zo.eps, -2 * zo.eps, zo.eps):  # the perturbation round trip of training
                    perturb_(b.master, z, scale)
            # copies (zo.perturb, n-SPSA) perturb out of place: the master only ever receives the updates
            for seed, grad, lr, wd in p.updates(zo.weight_decay):
                apply_update_(b.master, perturber.fill(z, seed, b.key), grad, lr, wd, perturber.decay_spans(b))
        b.sync()
    perturber.close()


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], state: dict, log: SeedLog) -> None:
    """Write weights (name -> fp32 tensor, flushed), state and seed log into directory `path`."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    log.write(os.path.join(path, "seedlog.jsonl"))


def read_state(path: str) -> dict:
    f = os.path.join(path, "state.json")
    if not os.path.isfile(f):
        raise ConfigError(f"checkpoint {path!r} has no state.json (not a distzo2 checkpoint)")
    with open(f) as fh:
        return json.load(fh)
