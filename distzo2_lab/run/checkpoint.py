"""Checkpoints and seed logs: a fine-tuning run as a base model plus one (seed, g, lr) per step.

MeZO (arXiv 2305.17333, Sec. 2.1) notes that a whole ZO run is recoverable from its seeds and
projected gradients. A checkpoint is a directory: ``model.safetensors`` (flushed fp32 masters),
``state.json`` (step, run config, where the base came from) and ``seedlog.jsonl``. Replaying the
log re-runs exactly the arithmetic of training (+eps, -2 eps, +eps, update) with z regenerated,
so the rebuilt weights are bit-identical, not merely close.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict

import torch
from safetensors.torch import load_file, save_file

from distzo2_lab.config import ConfigError, ZOConfig, copies_perturbation, is_family
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.zo.perturb import Perturber
from distzo2_lab.zo.spsa import PendingUpdate, apply_update_, perturb_, update_terms


def digest(adapter: BlockAdapter, values=None) -> str:
    """sha256 of every unique parameter (fp32 bytes, canonical bucket order, names included).

    `values(bucket) -> flat fp32 tensor` supplies buckets whose values live in a store."""
    h = hashlib.sha256()
    for b in adapter.buckets:
        h.update(b.key.encode())
        for s in b.slots:
            h.update(s.name.encode())
        flat = b.master if b.master is not None else values(b)
        flat = flat.detach().cpu()
        if flat.dtype != torch.float32:  # a bf16 master (precision.master) hashes as its exact fp32 values
            flat = flat.float()
        h.update(flat.contiguous().numpy())  # hashed in place: no bytes copy of the bucket
        del flat  # a bucket read from a store is freed before the next one is read
    return h.hexdigest()


def checkpoint_tensors(adapter: BlockAdapter, values=None) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor of every unique parameter, as a checkpoint saves them.

    `values(bucket) -> flat fp32 tensor` supplies buckets whose values live in a store."""
    out: dict[str, torch.Tensor] = {}
    for b in adapter.buckets:
        out.update(b.state(None if b.master is not None else values(b)))
    return {k: v.float() for k, v in out.items()}  # a bf16 master (precision.master) is exact in fp32


def load_weights(adapter: BlockAdapter, path: str) -> None:
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error kinds for a damaged file
        raise ConfigError(f"checkpoint weights {path!r} cannot be read ({str(e).splitlines()[0]})") from None
    missing = [s.name for b in adapter.buckets for s in b.slots if s.name not in tensors]
    if missing:
        raise ConfigError(f"checkpoint {path!r} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for b in adapter.buckets:
        b.load(tensors)


class SeedLog:
    """Header (base model, ZO hyper-parameters) + one record per step, as JSON lines."""

    def __init__(self, base: dict, zo: ZOConfig, records: list[dict] | None = None):
        self.base, self.zo, self.records = base, zo, list(records or [])
        self._files = []

    def append(self, step: int, seed: int, grad: float, lr: float, terms: tuple = (),
               method: dict | None = None) -> None:
        """One step's record. `method`: the method family's scalars a replay needs beyond (seed, g, lr)
        (zo.family_reference.replay_scalars: Adam's t, HiZOO's curvature, ZO-SGD-Cons's accept)."""
        rec = {"step": step, "seed": seed, "grad": grad, "lr": lr}
        if terms:  # n-SPSA: every direction's (seed, g)
            rec["terms"] = [list(t) for t in terms]
        if method:
            rec["method"] = dict(method)
        self.records.append(rec)
        for f in self._files:  # live logs: the record is in the file before the step commits
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def keep_live(self, path: str) -> None:
        """Rewrite the log at `path` and keep appending each new record to it as it comes (a log
        may be live in several files: a disk store's and a run's output directory)."""
        if any(os.path.abspath(f.name) == os.path.abspath(path) for f in self._files):
            return  # already live there (an output directory that is also the store)
        self.write(path)
        self._files.append(open(path, "a"))

    def write(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({"base": self.base, "zo": asdict(self.zo), "noise": NOISE_RULE}) + "\n")
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    @classmethod
    def read(cls, path: str, torn_tail: bool = False) -> SeedLog:
        """The log at `path`; ConfigError naming the file and line of anything that is not one.

        `torn_tail=True` drops an unreadable last line (a record cut short by a crash while it was
        being appended: a disk store never committed that step)."""
        if not os.path.isfile(path):
            raise ConfigError(f"seed log {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                numbered = [(n, ln) for n, ln in enumerate(f, 1) if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a readable seed log ({e})") from None
        if not numbered:
            raise ConfigError(f"{path}: line 1: empty file, not a seed log")
        head = _json_line(path, *numbered[0])
        if not isinstance(head, dict) or not isinstance(head.get("base"), dict) or not isinstance(head.get("zo"), dict):
            raise ConfigError(f"{path}: line {numbered[0][0]}: not a seed log header "
                              "(expected {\"base\": ..., \"zo\": ...}); is this a distzo2 seedlog.jsonl?")
        if head.get("noise") != NOISE_RULE:
            raise ConfigError(f"{path}: line {numbered[0][0]}: this seed log's noise rule is "
                              f"{head.get('noise', 'the chunked generators of earlier versions')!r}, not "
                              f"{NOISE_RULE!r}: its z cannot be regenerated here, so it can neither be "
                              "replayed nor resumed; train again from its base model")
        fields = {f.name for f in dataclasses.fields(ZOConfig)}
        if set(head["zo"]) - fields or "model" not in head["base"]:
            raise ConfigError(f"{path}: line {numbered[0][0]}: header has unknown zo fields "
                              f"{sorted(set(head['zo']) - fields)} or no base model")
        records = []
        if torn_tail and len(numbered) > 1 and not numbered[-1][1].endswith("\n"):
            numbered = numbered[:-1]
        for n, ln in numbered[1:]:
            rec = _json_line(path, n, ln)
            if not isinstance(rec, dict) or not _RECORD.issubset(rec):
                raise ConfigError(f"{path}: line {n}: not a step record (needs {', '.join(sorted(_RECORD))})")
            if records and rec["step"] != records[-1]["step"] + 1:
                raise ConfigError(f"{path}: line {n}: step {rec['step']} follows step {records[-1]['step']}")
            records.append(rec)
        return cls(head["base"], ZOConfig(**head["zo"]), records)


_RECORD = {"step", "seed", "grad", "lr"}
NOISE_RULE = "counter-2"
"""How z is made from a step seed (zo.noise's counter-based function); written in every seed log.
counter-1 drew each gaussian element from its own hash; counter-2 draws a pair (zo.noise.pair_of)."""


def _json_line(path: str, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        what = "truncated or corrupted" if n > 1 else "not JSON"
        raise ConfigError(f"{path}: line {n}: {what} ({e.msg}, column {e.colno}); not a readable seed log") from None


@torch.no_grad()
def replay(adapter: BlockAdapter, log: SeedLog, threads: int = 1) -> None:
    """Apply every logged step to the adapter's weights (which must be the log's base)."""
    zo = log.zo
    if is_family(zo):  # the method's rule, state and schedules, step by step, from the logged scalars
        from distzo2_lab.zo.family_reference import EagerFamily

        family = EagerFamily(adapter, zo, threads=threads)
        for r in log.records:
            family.replay_step(r)
        return
    perturber = Perturber(zo.noise).freeze(adapter.buckets, zo.freeze)
    round_trip = not copies_perturbation(zo)  # in place, the weights carry the round trip's rounding
    for b in adapter.buckets:
        z = torch.empty(b.numel if round_trip else 0, device=b.master.device)
        for r in log.records:
            p = PendingUpdate(r["step"], r["seed"], r["grad"], r["lr"], tuple(map(tuple, r.get("terms", ()))))
            if not round_trip:  # copies: the master only ever receives the updates, by the fused pass's rule
                perturber.visit(b, b.master, *update_terms(p, zo.weight_decay))
                continue
                perturber.fill(z, r["seed"], b.key)
                for scale in (zo.eps, -2 * zo.eps, zo.eps):  # the perturbation round trip of training
                    perturb_(b.master, z, scale)
            for seed, grad, lr, wd in p.updates(zo.weight_decay):
                apply_update_(b.master, perturber.fill(z, seed, b.key), grad, lr, wd, perturber.decay_spans(b))
        b.sync()


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], state: dict, log: SeedLog) -> None:
    """Write weights (name -> fp32 tensor, flushed), state and seed log into directory `path`."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    log.write(os.path.join(path, "seedlog.jsonl"))


def save_method_state(path: str, sd: dict) -> None:
    """The method family's state (an engine's state_dict(), flushed) into `path`: its tensors in
    method_state.safetensors, its scalars in method_state.json."""
    if sd.get("pending") is not None:
        raise ValueError("flush the engine before saving its method state (an update is pending)")
    tensors = {f"state/{k}/{n}": t for k, v in sd["state"].items() for n, t in v.items()}
    tensors.update({f"thresholds/{k}": t for k, t in sd["thresholds"].items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(path, "method_state.safetensors"))
    with open(os.path.join(path, "method_state.json"), "w") as f:
        json.dump({k: sd[k] for k in ("v_seed", "updates", "step")}, f)


def load_method_state(path: str) -> dict:
    """What save_method_state wrote, as a state_dict() for an engine's load_state_dict()."""
    f = os.path.join(path, "method_state.json")
    if not os.path.isfile(f):
        raise ConfigError(f"checkpoint {path!r} has no method_state.json: it was saved by a ZO-SGD run; resume it "
                          "with zo.optimizer='sgd', zo.perturbation='dense', zo.estimator='two-point'")
    with open(f) as fh:
        sd = json.load(fh)
    state, thresholds = {}, {}
    for name, t in load_file(os.path.join(path, "method_state.safetensors")).items():
        kind, _, rest = name.partition("/")
        if kind == "state":
            key, _, n = rest.rpartition("/")
            state.setdefault(key, {})[n] = t
        else:
            thresholds[rest] = t
    return {**sd, "state": state, "thresholds": thresholds, "pending": None}


def read_state(path: str) -> dict:
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path!r} does not exist (give a directory written by --save)")
    f = os.path.join(path, "state.json")
    if not os.path.isfile(f):
        raise ConfigError(f"checkpoint {path!r} has no state.json (not a distzo2 checkpoint)")
    try:
        with open(f) as fh:
            state = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: line {e.lineno}: not JSON ({e.msg}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or not {"step", "config", "base"}.issubset(state):
        raise ConfigError(f"{f}: lacks step / config / base; not a distzo2 checkpoint state")
    return state


def check_checkpoint(path: str) -> dict:
    """Everything a resume reads, checked before any work: state.json, weights, seed log."""
    state = read_state(path)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise ConfigError(f"checkpoint {path!r} has no model.safetensors (no weights to resume from)")
    SeedLog.read(os.path.join(path, "seedlog.jsonl"))
    return state
