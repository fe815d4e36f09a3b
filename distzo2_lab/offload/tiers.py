"""Assemble an offloaded run: adapter with a block shell, a host or disk store, the streamer.

The blocks of a preset are generated one at a time from their own init seed (the same values a
fully built model has), and a checkpoint directory's blocks are read one at a time from its
safetensors files, so a store is created without the whole model ever being in memory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distzo2_lab.config import ConfigError, OffloadConfig, is_family
from distzo2_lab.models.base import BlockAdapter
from distzo2_lab.models.lora import wrap_peft
from distzo2_lab.models.prefix import init_prefix_
from distzo2_lab.models.presets import (
    build_model,
    checkpoint_config,
    init_group_,
    init_missing_,
    is_local_dir,
    preset_config,
)
from distzo2_lab.models.registry import adapter_class, adapter_for
from distzo2_lab.observe.events import Recorder
from distzo2_lab.offload.frozen_base import SharedBase, open_disk_base
from distzo2_lab.offload.store import DiskStore, FrozenBaseHostStore, HostStore, SharedHostStore
from distzo2_lab.offload.stream import Streamer
from distzo2_lab.seeds import derive_seed
from distzo2_lab.zo.engine import LEAN_SLAB, ResidentSet
from distzo2_lab.zo.perturb import frozen_spans
from distzo2_lab.zo.spsa import perturb_

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


class _SafetensorsReader:
    """name -> tensor from a checkpoint directory's (possibly sharded) safetensors files.

    `prefix` is the model's base-model prefix (``bert``): a checkpoint saved from the bare base
    model (``BertModel``) names its tensors without it."""

    def __init__(self, directory: str, prefix: str = ""):
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ConfigError(f"model={directory!r}: offloading reads safetensors weights; none found")
        self.handles = [safe_open(os.path.join(directory, f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}
        self.prefix = prefix + "." if prefix else ""

    def key(self, name: str) -> str | None:
        """The checkpoint's name for model parameter `name`, or None when it lacks the tensor."""
        if name in self.where:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix):] in self.where:
            return name[len(self.prefix):]
        return None

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key is None:
            raise ConfigError(f"checkpoint lacks tensor {name!r}")
        return self.where[key].get_tensor(key).float()


def _copy_into_bucket(bucket, out: torch.Tensor, get) -> None:
    for s in bucket.slots:
        out[s.start : s.stop].copy_(get(s).reshape(-1))


def _meta_model(cfg, base: dict):
    """The family's model on the meta device whose resident modules and block 0 (the shell) have
    real, still untouched storage: nothing is initialised twice and no page is touched before use.
    A base naming peft adapters gets them wrapped around it: LoRA's (block 0's real, the others
    meta) or a prefix table (real: it is resident)."""
    model = adapter_class(cfg.model_type).meta_model(cfg)
    if base.get("peft") is None:
        return model
    return wrap_peft(model, base["peft"], base.get("peft_seed", 0))


def _lora_blocks(base: dict):
    """make(bucket, out) for the blocks of a LoRA base: copied from the wrapped model, built whole
    on the first call (peft draws every lora_A from one generator in module order, so a block's
    adapters are known only once those before it are drawn), and freed with `values`."""
    held: list[BlockAdapter] = []

    def make(bucket, out: torch.Tensor) -> None:
        if not held:
            model = build_model(base["model"], seed=base.get("init_seed", 0))
            held.append(adapter_for(wrap_peft(model, base["peft"], base.get("peft_seed", 0))))
        out.copy_(next(b for b in held[0].blocks if b.key == bucket.key).master)

    return make


def build_offloaded(base: dict, storage: str = "fp32", defer_resident: bool = False) -> tuple[BlockAdapter, callable]:
    """An adapter whose blocks are layout-only, and values(key) -> flat fp32 start values of any
    bucket (a resident bucket's own master, or a block generated / read into one reused buffer).

    defer_resident: a preset's resident buckets are initialised on the first values() call for one
    of them, after the block buffer is freed (a store written blocks first never holds both)."""
    model, seed = base["model"], base.get("init_seed", 0)
    if is_local_dir(model):
        cfg = checkpoint_config(model)
        adapter = adapter_for(_meta_model(cfg, base), storage)
        reader = _SafetensorsReader(model, adapter.model.base_model_prefix)
        missing = {s.name for b in adapter.buckets for s in b.slots if reader.key(s.name) is None}
        lacking = [s.name for b in adapter.blocks for s in b.slots if s.name in missing]
        if lacking and adapter.wrapper is None:  # a LoRA base's blocks come from the wrapped model
            raise ConfigError(f"model={model!r}: checkpoint lacks block tensors, e.g. {lacking[:3]}")
        for b in (adapter.bucket_in, adapter.bucket_out):
            b.bind(b.master)  # fill the fp32 master, not a bf16 / fp16 working copy
            for s in b.slots:
                if s.name not in missing:
                    b.master[s.start : s.stop].copy_(reader.get(s.name).reshape(-1))
        init_missing_(adapter.model, missing, seed)  # a new head: the seeded init build_model gives it
        for b in (adapter.bucket_in, adapter.bucket_out):
            b.sync()
            b.bind(b.working)

        def make(bucket, out: torch.Tensor) -> None:
            _copy_into_bucket(bucket, out, lambda s: reader.get(s.name))
    else:
        cfg = preset_config(model)
        family = adapter_class(cfg.model_type)
        adapter = adapter_for(_meta_model(cfg, base), storage)
        std = family.init_std(cfg)

        def init_resident() -> None:
            # Resident buckets: initialised in place (their parameters are views of the masters), with
            # the seeds and order build_model uses, so the values equal a fully built model's.
            groups, done = dict(adapter.groups(adapter.model)), set()
            for b in (adapter.bucket_in, adapter.bucket_out):
                if b.master is None:  # deferred: fresh buffers, untouched until now
                    b.attach(torch.empty(b.numel), None if b.storage == "fp32" else
                             torch.empty(b.numel, dtype=b.working_dtype))
                b.bind(b.master)  # initialise the fp32 master, not a bf16 / fp16 working copy
                init_group_(groups[b.key], std, derive_seed(seed, "init", b.key), done)
                if b is adapter.bucket_in and adapter.prefix is not None:  # a prefix table: peft's seeded init
                    init_prefix_(adapter.prefix.weight, base.get("peft_seed", 0))
                b.sync()
                b.bind(b.working)

        if not defer_resident:
            init_resident()
        else:  # the buckets' masters hold copies made at construction: free them until then
            for b in (adapter.bucket_in, adapter.bucket_out):
                b.detach()
                b.unbind()
        # Blocks: a private fp32 block whose parameters are pointed at the output buffer, so the
        # init writes there directly (the adapter's shell may hold bf16 / fp16 working views).
        init_block = adapter.new_block()
        init_params = dict(init_block.named_parameters())

        def make(bucket, out: torch.Tensor) -> None:
            prefix = adapter.block_prefix(int(bucket.key.split(".")[1])) + "."
            for s in bucket.slots:
                init_params[s.name[len(prefix):]].data = out[s.start : s.stop].view(s.shape)
            init_group_([("", init_block)], std, derive_seed(seed, "init", bucket.key), set())

    if adapter.wrapper is not None and adapter.prefix is None:  # a prefix leaves the blocks as they are
        make = _lora_blocks(base)
    scratch: list[torch.Tensor] = []
    pending = [init_resident] if defer_resident and not is_local_dir(model) else []

    @torch.no_grad()
    def values(key: str) -> torch.Tensor:
        bucket = next(b for b in adapter.buckets if b.key == key)
        if pending and key in (adapter.bucket_in.key, adapter.bucket_out.key):
            scratch.clear()  # deferred: free the block buffer (and the init block's views of it) first
            for p in init_params.values():
                p.data = torch.empty(0)
            pending.pop()()
        if bucket.master is not None:
            return bucket.master
        if not scratch:
            scratch.append(torch.empty(max(b.numel for b in adapter.blocks)))
        out = scratch[0][: bucket.numel]
        make(bucket, out)
        return out

    return adapter, values


def method_of(zo) -> dict | None:
    """The method family's rule a disk store's slots are laid out for (None: ZO-SGD's)."""
    if not is_family(zo):
        return None
    return {k: getattr(zo, k) for k in ("optimizer", "perturbation", "estimator", "directions")}


def _method_text(method: dict | None) -> str:
    if method is None:
        return "ZO-SGD (zo.optimizer='sgd', zo.perturbation='dense', zo.estimator='two-point')"
    return ", ".join(f"zo.{k}={v!r}" for k, v in method.items())


def _with_state(values, state: tuple[tuple[str, float], ...]):
    """values(key) followed by each state tensor at its initial value: a new family slot's
    [master | state_0 | state_1 ...] (values itself when there is no state)."""
    if not state:
        return values

    def wide(key: str) -> torch.Tensor:
        flat = values(key)
        n = flat.numel()
        out = torch.empty(n * (1 + len(state)))
        out[:n].copy_(flat)
        for j, (_, init) in enumerate(state):
            out[n * (1 + j) : n * (2 + j)].fill_(init)
        return out

    return wide


@dataclass(frozen=True)
class NodeShare:
    """How the ranks of a distributed run share one store per node: the node's first rank (the
    leader) creates and fills it, and commits the disk tier's steps; `barrier` spans all ranks;
    `name` is common to the run (the shared-memory file's name)."""

    leader: bool
    barrier: Callable[[], None]
    name: str


class Offload:
    """adapter + store + streamer for one rank, and the helpers training needs around them."""

    def __init__(self, base: dict, offload: OffloadConfig, storage: str = "fp32", device: str = "cpu",
                 recorder: Recorder | None = None, slicer=None, node: NodeShare | None = None, master: str = "fp32",
                 freeze: tuple[str, ...] = (), state: tuple[tuple[str, float], ...] = (),
                 base_dtype: torch.dtype | None = None, method: dict | None = None):
        """`master`: precision.master; 'bf16' keeps the blocks' masters in bf16 in a host store (half
        the host memory and the bytes each visit moves). `freeze`: the run's zo.freeze patterns; with
        the adapter's own (a LoRA model's base) they are the spans no write-back carries. `state`:
        (name, initial value) of the optimiser state of the method family (zo/methods.py), held in
        each block's host slot after its master (zo/family_engine.py), so it streams with the block.
        `base_dtype`: the dtype the forwards read the fixed spans in (the compute dtype of a copies
        run); a store whose ranks move whole fp32 blocks then uploads them in it
        (store.FrozenBaseHostStore on one rank, offload/frozen_base.py for the shared and disk stores).
        `method`: the method family's rule (method_of(zo); None for ZO-SGD), which a disk store's slots
        are laid out for: written in a new store's manifest, checked against an existing one's."""
        self.config, self.node = offload, node
        if state and ((node is not None and offload.tier != "disk") or offload.lean):
            raise ConfigError(f"optimiser state streams with its block in a one-rank host store or a disk store; "
                              f"offload.tier={offload.tier!r}"
                              f"{' with several ranks' if not offload.lean else ' lean=True'} cannot hold it. Choose "
                              "offload.tier='disk' or one rank, and offload.lean=False, or zo.optimizer sgd / sign / "
                              "conservative (no state)")
        if state and offload.tier == "disk" and method is None:
            raise ValueError("a disk store holding optimiser state needs method= (the rule its slots are laid out for)")
        if master == "bf16" and offload.tier != "host":
            raise ConfigError(f"precision.master='bf16' is held in memory; offload.tier={offload.tier!r} keeps fp32 "
                              "slots. Choose offload.tier='host' or precision.master='fp32'")
        dtype = torch.bfloat16 if master == "bf16" else torch.float32
        if node is not None and offload.lean:
            raise ConfigError("offload.lean=True keeps one rank's embeddings in the store; a distributed run "
                              "shares the store between ranks: choose offload.lean=False")
        # a new disk store is written blocks first: its resident buckets are made after the blocks
        self.adapter, values = build_offloaded(base, storage, defer_resident=offload.tier == "disk")
        a = self.adapter
        spans = frozen_spans(a.buckets, tuple(freeze) + a.frozen)
        fixed = {b.key: spans[b.key] for b in a.blocks if b.key in spans}
        blocks = [(b.key, b.numel) for b in a.blocks]
        keys, numels = [k for k, _ in blocks], [n for _, n in blocks]
        by_index = {i: fixed[k] for i, k in enumerate(keys) if k in fixed}
        # the frozen base travels in the compute dtype where whole fp32 blocks with no state move
        half = base_dtype if fixed and slicer is None and not state and dtype == torch.float32 else None
        if offload.tier == "host" and node is not None:  # one copy per node, in shared memory
            path = os.path.join(SHM_DIR, f"distzo2-{node.name}.bin")
            slots = 1 if slicer is not None else 2  # see SharedHostStore
            if node.leader:
                self.store = SharedHostStore(path, keys, numels, create=True, pin=device == "cuda", slots=slots,
                                             dtype=dtype)
                if half is not None:
                    self.store.base = SharedBase(path[:-4] + "-base.bin", self.store, by_index, half, create=True,
                                                 pin=device == "cuda")
                for i, key in enumerate(keys):
                    self.store.fill(i, values(key))
            del values  # its block buffer (and a LoRA base's wrapped model)
            node.barrier()  # the file is whole
            if not node.leader:
                self.store = SharedHostStore(path, keys, numels, create=False, pin=device == "cuda", slots=slots,
                                             dtype=dtype)
                if half is not None:
                    self.store.base = SharedBase(path[:-4] + "-base.bin", self.store, by_index, half, create=False,
                                                 pin=device == "cuda")
            node.barrier()  # every rank has mapped it: its name can go
            if node.leader:
                self.store.unlink()
            self.resumed_step = -1
        elif offload.tier == "host" and half is not None:  # the frozen base goes up in the compute dtype
            self.store = FrozenBaseHostStore(keys, numels, by_index, half, pin=device == "cuda")
            for i, key in enumerate(keys):
                self.store.blocks[i].copy_(values(key))
            self.store.seal()
            del values
            self.resumed_step = -1
        elif offload.tier == "host":
            wide = [n * (1 + len(state)) for n in numels]  # [master | state_0 | state_1 ...]
            self.store = HostStore(keys, wide, pin=device == "cuda", dtype=dtype)
            for i, (key, n) in enumerate(zip(keys, numels)):
                self.store.blocks[i][:n].copy_(values(key))
                for j, (_, init) in enumerate(state):
                    self.store.blocks[i][n * (1 + j) : n * (2 + j)].fill_(init)
            del values
            self.resumed_step = -1
        else:
            path = offload.store
            if node is not None and not node.leader:
                node.barrier()  # the leader has created (or checked) the store
            if os.path.exists(os.path.join(path, "manifest.json")):
                self.store = DiskStore(path)
                held = self.store.manifest["base"]
                if any(held.get(k) != base.get(k) for k in ("model", "init_seed", "peft", "peft_seed")):
                    raise ConfigError(f"offload.store={path!r} holds {held}, not {base}")
                if (was := self.store.manifest.get("method")) != method:
                    raise ConfigError(f"offload.store={path!r} holds a run of {_method_text(was)}, not "
                                      f"{_method_text(method)}: its slots hold that method's state. Pass the same "
                                      "zo values or choose another offload.store")
                if fixed and self.store.manifest.get("version", 1) < 2:
                    raise ConfigError(f"offload.store={path!r} keeps the start values in one slot only; zo.freeze "
                                      "(or peft) writes back only what changes: create a new offload.store")
            else:  # a family slot is [master | state_0 ...], as on the host; resident entries too
                w = 1 + len(state)
                self.store = DiskStore.create(path, [(k, n * w) for k, n in blocks],
                                              [("in", a.bucket_in.numel * w), ("out", a.bucket_out.numel * w)],
                                              base, _with_state(values, state), method)
            # the fixed spans in the compute dtype, made once (the leader's) and found on reopening
            self.store.base = open_disk_base(self.store, by_index, half, leader=node is None or node.leader)
            if node is not None and node.leader:
                node.barrier()
            for b in (a.bucket_in, a.bucket_out):
                values(b.key)  # deferred resident buckets exist from here on (a new store made them)
            del values  # its block buffer
            for b in (a.bucket_in, a.bucket_out):  # the committed resident state
                if not (offload.lean and b is a.bucket_in):  # lean: loaded when needed
                    self.store.read_resident(b.key, b.master)
                    b.sync()
            self.resumed_step = self.store.committed
        self.lean = offload.lean
        a = self.adapter
        if offload.tier == "host":
            self.lean = False
        for b in (a.bucket_in, a.bucket_out):
            b.master = b.master.to(device)
            b.attach(b.master, None if storage == "fp32" else b.master.to(b.working.dtype))
        if device != "cpu":
            for layer in {id(x): x for x in a.layers}.values():
                layer.to(device)
            a.buffers_to(device)  # position ids, rotary frequencies: beside the resident weights
        self.slicer = slicer
        # lean: no spare buffer (a block's upload waits for the previous write-back)
        self.streamer = Streamer(self.store, device, offload.prefetch, recorder, offload.link_gbps, slicer,
                                 spare=0 if self.lean else 1, fixed=fixed, sections=1 + len(state))
        if self.lean:  # the embeddings live in the store; LeanResident loads them when needed
            a.bucket_in.detach()
            a.bucket_in.unbind()
        wide = 1 + len(state) if offload.tier == "disk" else 1  # a family commit: [master | state...]
        self._snap = {b.key: torch.empty(b.numel * wide) for b in (a.bucket_in, a.bucket_out)
                      if not (self.lean and b is a.bucket_in)}
        self._committed = None
        self.method, self._engine = method, None

    def engine_options(self) -> dict:
        """What ZO2Engine takes from this tier: the streamer, the resident keeper, for a lean tier
        trim_buffers (between sweeps only the embeddings are held), and for a store shared by the
        ranks of a node what ends their flushes (after_flush)."""
        return {"streamer": self.streamer, "resident": self.resident_keeper(), "trim_buffers": self.lean,
                "after_flush": self.after_flush if self.node is not None else None}

    def after_flush(self, engine) -> None:
        """The ranks sharing this store leave a flush together. A step ends with the loss exchange,
        a flush with nothing: a rank that ran ahead into the next step would write a block's slot
        while a slower rank still read it for its flush (and applied the update twice). In place,
        a step writes back what differs from what it read (the +eps, -2 eps, +eps round trip), so
        it must not read the slots it writes, which other ranks read: the disk store commits the
        flush (the step stays, its update is applied), and the next step writes the other slots."""
        self.streamer.drain()
        self.node.barrier()  # every rank's writes of the flush have landed
        if self.store.tier != "disk" or engine.copies:
            return
        snaps = self._snapshot()[0] if self.node.leader else {}
        self.store.commit(self.store.committed, snaps, leader=self.node.leader, flushed=True)
        self.node.barrier()  # the manifest names the flushed slots: the committed ones are free

    def resident_keeper(self):
        """What the engine's `resident=` takes: LeanResident for a lean disk tier, else the default."""
        if not self.lean:
            return None
        return lambda engine: LeanResident(engine, self.store)

    def block_values(self, bucket) -> torch.Tensor:
        """A bucket's current values when they live in the store (after the lanes have drained)."""
        self.streamer.drain()
        if bucket is self.adapter.bucket_in:
            return self.store.read_resident(bucket.key)
        i = self.adapter.blocks.index(bucket)
        if self.slicer is not None:  # each rank's store is current on its own shard only
            return self.slicer.whole(lambda dst, start: self.store.read_into(i, dst, start=start), bucket.numel, i)
        out = torch.empty(bucket.numel)
        self.store.read_into(i, out)
        return out

    def shared_bytes(self) -> int:
        """Bytes of the store this rank shares with the other ranks of its node (0: none)."""
        if not isinstance(self.store, SharedHostStore):
            return 0
        return self.store.nbytes_total + (self.store.base.nbytes_total if self.store.base is not None else 0)

    def commit(self, step: int) -> None:
        """Disk tier: persist step `step` on the offload lane, after its block write-backs. With
        several ranks on one store: once every rank's writes have landed, the leader commits, and no
        rank goes on to the next step's writes (into the slots of step - 1) before the manifest has
        moved to `step`."""
        if self.store.tier != "disk":
            return
        if self.method is not None and self._engine is None:
            raise RuntimeError("a method family's disk run commits its state: call keep_method_state(engine) first")
        if self.node is not None:
            self.streamer.drain()
            self.node.barrier()  # every rank's block writes of the step have landed
            snaps, run_state = self._snapshot() if self.node.leader else ({}, None)
            self.store.commit(step, snaps, leader=self.node.leader, run_state=run_state)
            self.node.barrier()  # the manifest holds `step`: the slots of step - 1 are free
            return
        if self._committed is not None:
            self._committed.wait()  # the snapshot buffers of the previous commit are free again
        import threading

        self._committed = threading.Event()
        done, (snaps, run_state) = self._committed, self._snapshot()

        def persist():
            self.store.commit(step, snaps, run_state=run_state)
            done.set()

        self.streamer.on_offload_lane(persist)

    def _snapshot(self) -> tuple[dict, dict | None]:
        """The resident buckets' [master | state...] (into the snapshot buffers) and the method's
        per-run scalars, as the step ends: what a commit persists beside the blocks' slots."""
        a, e = self.adapter, self._engine
        for b in (a.bucket_in, a.bucket_out):
            if b.key in self._snap:
                snap, n = self._snap[b.key], b.numel
                snap[:n].copy_(b.master)
                for j, (name, _) in enumerate(e.method.state if e is not None else ()):
                    snap[n * (1 + j) : n * (2 + j)].copy_(e.state[b.key][name])
        return self._snap, None if e is None else e.run_state()

    def keep_method_state(self, engine, record: dict | None = None) -> None:
        """Disk tier, method family: commit `engine`'s resident state and per-run scalars with every
        step. A reopened store gives them back from its committed step, and `record` (the seed log's
        record of that step) the update it owes."""
        if self.store.tier != "disk":
            return  # host memory: nothing outlives the process
        self._engine = engine
        if self.store.committed < 0:
            return
        a = self.adapter
        for b in (a.bucket_in, a.bucket_out):
            slot = self.store.read_resident(b.key)  # the committed [master | state...]
            for j, (name, _) in enumerate(engine.method.state):
                engine.state[b.key][name].copy_(slot[b.numel * (1 + j) : b.numel * (2 + j)])
        engine.resume(self.store.manifest["run_state"], record)

    def close(self) -> None:
        self.streamer.drain()
        self.streamer.close()
        self.store.close()




class LeanResident:
    """Memory-lean keeper of the resident buckets for the disk tier.

    The embedding bucket (tied to the head) is the largest resident piece: OPT-1.3B's is 0.43 GB
    of fp32. Here it lives in the store between uses: loaded for the embedding, parked in scratch
    files in its +eps and -eps states while the blocks stream, loaded again for the head, restored
    and written back. Its noise is regenerated slab by slab (counter-based, so the same z), so no
    full-size noise buffer exists. Same elementwise arithmetic as :class:`ResidentSet`: bit-equal.
    """

    def __init__(self, engine, store: DiskStore, slab: int = LEAN_SLAB):

        self.engine, self.store, self.adapter = engine, store, engine.adapter
        if engine.copies:
            raise ConfigError("offload.lean=True runs MeZO's in-place step; zo.directions > 1 (n-SPSA) and "
                              "zo.perturb='copy' need offload.lean=False")
        self.bin = self.adapter.bucket_in
        self.out = ResidentSet(engine, [self.adapter.bucket_out])  # the small out bucket stays in memory
        self.slab = slab
        self._z = torch.empty(min(self.slab, self.bin.numel))
        self._seed = None

    # -- the embedding bucket's life cycle -------------------------------------------------
    def _attach(self, master: torch.Tensor) -> None:
        storage = self.bin.storage
        self.bin.attach(master, None if storage == "fp32" else master.to(self.bin.working_dtype))

    def _load(self) -> None:
        self.engine.streamer.drain()  # its queued write of this bucket must land first
        self._attach(self.store.read_resident("in").to(self.engine.device))

    def _write_back(self) -> None:
        """Queue the bucket's new state on the offload lane: stores are written (and steps
        committed) in one order, by one thread."""
        master, store = self.bin.master, self.store
        self.engine.streamer.on_offload_lane(lambda: store.write_resident("in", master))

    def _unload(self) -> None:
        self.bin.detach()
        self.bin.unbind()

    def _noise(self, seed: int, fn) -> None:
        self.engine.perturber.by_slab(self.bin.master, seed, self.bin.key, self._z, lambda m, z, _: fn(m, z))
        self.bin.sync()

    def _pending(self) -> None:
        p, e = self.engine.pending, self.engine
        if p is None:
            return
        with e.span("update"):
            if e.zo.weight_decay:
                keep = 1.0 - p.lr * e.zo.weight_decay
                for a, b in self.engine.perturber.decay_spans(self.bin):
                    self.bin.master[a:b].mul_(keep)
            self._noise(p.seed, lambda m, z: m.add_(z, alpha=-p.lr * p.grad))

    # -- the ResidentSet interface -----------------------------------------------------------
    def flush(self) -> None:
        self.out.flush()
        self._load()
        self._pending()
        self._write_back()
        self._unload()
        self.engine.streamer.drain()  # written and freed before the flush's sweep takes a block buffer

    def begin(self, seed: int, micro: list) -> list:
        e, a, eps = self.engine, self.adapter, self.engine.zo.eps
        self._seed = seed
        self.out.to_plus(seed)
        self._load()
        self._pending()
        with e.span("rng"):
            self._noise(seed, lambda m, z: perturb_(m, z, eps))
        plus, minus = e.signs
        hs = []
        with e.span("embed"):
            for ids, mask in micro:
                h_plus, ctx = a.embed(ids, mask) if plus else (None, None)  # (B, T, C)
                hs.append([h_plus, None, ctx, None])
        if plus:
            self.store.stash("plus", self.bin.working)
        self._noise(seed, lambda m, z: perturb_(m, z, -2 * eps))
        self.out.to_minus()
        with e.span("embed"):
            for h, (ids, mask) in zip(hs, micro):
                if minus:
                    h[1], h[3] = a.embed(ids, mask)  # (B, T, C)
        self.store.stash("minus", self.bin.master)
        self._unload()
        return hs

    def end(self, hs: list, labels: list, counts: list[int]) -> tuple[float, float]:
        e, eps, out = self.engine, self.engine.zo.eps, self.out
        with e.span("head"):  # one embedding matrix in memory at a time
            loss_minus = loss_plus = None
            if hs[0][1] is not None:
                self._attach(self.store.unstash("minus", self.bin.numel).to(e.device))
                loss_minus = out.losses([h[1] for h in hs], labels, counts, [h[3] for h in hs])
                self._unload()
            out.bind_plus()
            if hs[0][0] is not None:
                self.bin.bind(self.store.unstash("plus", self.bin.numel, self.bin.working_dtype).to(e.device))
                loss_plus = out.losses([h[0] for h in hs], labels, counts, [h[2] for h in hs])
                self.bin.unbind()
        out.restore()
        self._attach(self.store.unstash("minus", self.bin.numel).to(e.device))
        self._noise(self._seed, lambda m, z: perturb_(m, z, eps))
        self._write_back()
        self._unload()
        return loss_plus, loss_minus

    def embed(self, ids, mask):
        self._load()
        out = self.adapter.embed(ids, mask)
        self._unload()
        return out

    def head_loss(self, h, labels, ctx=None) -> float:
        self._load()
        loss = float(self.adapter.loss(self.adapter.head(h, ctx), labels))
        self._unload()
        return loss
