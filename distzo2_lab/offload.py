"""Assemble an offloaded run: adapter with a block shell, a host or disk store, the streamer.

The blocks of a preset are generated one at a time from their own init seed (the same values a
fully built model has), and a checkpoint directory's blocks are read one at a time from its
safetensors files, so a store is created without the whole model ever being in memory.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ConfigError, OffloadConfig
from .engine import ResidentSet
from .events import Recorder
from .models import OPTAdapter
from .models.opt import opt_groups
from .models.presets import init_group_, is_local_dir, opt_config
from .perturb import chunk_seed
from .store import DiskStore, HostStore
from .stream import Streamer
from .zo import perturb_


class _SafetensorsReader:
    """name -> tensor from a checkpoint directory's (possibly sharded) safetensors files."""

    def __init__(self, directory: str):
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

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"checkpoint lacks tensor {name!r}")
        return self.where[name].get_tensor(name).float()


def _copy_into_bucket(bucket, out: torch.Tensor, get) -> None:
    for s in bucket.slots:
        out[s.start : s.stop].copy_(get(s).reshape(-1))


def _meta_model(cfg):
    """An OPT on the meta device whose resident modules and block 0 (the shell) have real, still
    untouched storage: nothing is initialised twice and no page is touched before it is used."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        m = OPTForCausalLM(cfg)
    dec = m.model.decoder
    for mod in (dec.embed_tokens, dec.embed_positions, dec.project_in, dec.final_layer_norm,
                dec.project_out, m.lm_head, dec.layers[0]):
        if mod is not None:
            mod.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        m.lm_head.weight = dec.embed_tokens.weight
    return m.eval()


def build_offloaded(base: dict, storage: str = "fp32") -> tuple[OPTAdapter, callable]:
    """An adapter whose blocks are layout-only, and values(key) -> flat fp32 start values of any
    bucket (a resident bucket's own master, or a block generated / read into one reused buffer)."""
    model, seed = base["model"], base.get("init_seed", 0)
    if is_local_dir(model):
        from transformers import OPTConfig

        reader = _SafetensorsReader(model)
        cfg = OPTConfig.from_pretrained(model, local_files_only=True)
        cfg._attn_implementation = "sdpa"
        adapter = OPTAdapter(_meta_model(cfg), storage)
        for b in (adapter.bucket_in, adapter.bucket_out):
            _copy_into_bucket(b, b.master, lambda s: reader.get(s.name))
            b.sync()

        def make(bucket, out: torch.Tensor) -> None:
            _copy_into_bucket(bucket, out, lambda s: reader.get(s.name))
    else:
        from transformers.models.opt.modeling_opt import OPTDecoderLayer

        cfg = opt_config(model)
        adapter = OPTAdapter(_meta_model(cfg), storage)
        # Resident buckets: initialised in place (their parameters are views of the masters), with
        # the seeds and order build_model uses, so the values equal a fully built model's.
        groups, done = dict(opt_groups(adapter.model)), set()
        for b in (adapter.bucket_in, adapter.bucket_out):
            b.bind(b.master)  # initialise the fp32 master, not a bf16 / fp16 working copy
            init_group_(groups[b.key], cfg.init_std, chunk_seed(seed, "init", b.key), done)
            b.sync()
            b.bind(b.working)
        # Blocks: a private fp32 block whose parameters are pointed at the output buffer, so the
        # init writes there directly (the adapter's shell may hold bf16 / fp16 working views).
        with torch.device("meta"):
            init_block = OPTDecoderLayer(cfg, layer_idx=0)
        init_block.to_empty(device="cpu")
        init_params = dict(init_block.named_parameters())

        def make(bucket, out: torch.Tensor) -> None:
            prefix = f"model.decoder.layers.{bucket.key.split('.')[1]}."
            for s in bucket.slots:
                init_params[s.name[len(prefix):]].data = out[s.start : s.stop].view(s.shape)
            init_group_([("", init_block)], cfg.init_std, chunk_seed(seed, "init", bucket.key), set())

    scratch: list[torch.Tensor] = []

    @torch.no_grad()
    def values(key: str) -> torch.Tensor:
        bucket = next(b for b in adapter.buckets if b.key == key)
        if bucket.master is not None:
            return bucket.master
        if not scratch:
            scratch.append(torch.empty(max(b.numel for b in adapter.blocks)))
        out = scratch[0][: bucket.numel]
        make(bucket, out)
        return out

    return adapter, values


class Offload:
    """adapter + store + streamer for one rank, and the helpers training needs around them."""

    def __init__(self, base: dict, offload: OffloadConfig, storage: str = "fp32", device: str = "cpu",
                 recorder: Recorder | None = None, slicer=None):
        self.config = offload
        self.adapter, values = build_offloaded(base, storage)
        a = self.adapter
        blocks = [(b.key, b.numel) for b in a.blocks]
        if offload.tier == "host":
            self.store = HostStore([k for k, _ in blocks], [n for _, n in blocks], pin=device == "cuda")
            for i, (key, _) in enumerate(blocks):
                self.store.blocks[i].copy_(values(key))
            self.resumed_step = -1
        else:
            path = offload.store
            if os.path.exists(os.path.join(path, "manifest.json")):
                self.store = DiskStore(path)
                if self.store.manifest["base"].get("model") != base["model"] or \
                        self.store.manifest["base"].get("init_seed") != base.get("init_seed"):
                    raise ConfigError(f"offload.store={path!r} holds {self.store.manifest['base']}, not {base}")
            else:
                self.store = DiskStore.create(path, blocks, [("in", a.bucket_in.numel), ("out", a.bucket_out.numel)],
                                              base, values)
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
        self.slicer = slicer
        self.streamer = Streamer(self.store, device, offload.prefetch, recorder, offload.link_gbps, slicer)
        if self.lean:  # the embeddings live in the store; LeanResident loads them when needed
            a.bucket_in.detach()
            a.bucket_in.unbind()
        self._snap = {b.key: torch.empty(b.numel) for b in (a.bucket_in, a.bucket_out)
                      if not (self.lean and b is a.bucket_in)}
        self._committed = None

    def resident_keeper(self):
        """What the engine's `resident=` takes: LeanResident for a lean disk tier, else the default."""
        if not self.lean:
            return None
        def keeper(engine):
            engine.trim_buffers = True  # between sweeps only the embeddings are held
            return LeanResident(engine, self.store)
        return keeper

    def block_values(self, bucket) -> torch.Tensor:
        """A bucket's current values when they live in the store (after the lanes have drained)."""
        self.streamer.drain()
        if bucket is self.adapter.bucket_in:
            return self.store.read_resident(bucket.key)
        i = self.adapter.blocks.index(bucket)
        if self.slicer is not None:  # each rank's store is current on its own shard only
            out = torch.empty(self.slicer.padded(bucket.numel))
            start, stop = self.slicer.bounds(bucket.numel)
            self.store.read_into(i, out[start:stop], start=start)
            self.slicer.assemble(out, bucket.numel, -1, i)
            return out[: bucket.numel]
        out = torch.empty(bucket.numel)
        self.store.read_into(i, out)
        return out

    def commit(self, step: int) -> None:
        """Disk tier: persist step `step` on the offload lane, after its block write-backs."""
        if self.store.tier != "disk":
            return
        if self._committed is not None:
            self._committed.wait()  # the snapshot buffers of the previous commit are free again
        import threading

        self._committed = threading.Event()
        a = self.adapter
        for b in (a.bucket_in, a.bucket_out):
            if b.key in self._snap:
                self._snap[b.key].copy_(b.master)
        done, snaps = self._committed, self._snap

        def persist():
            self.store.commit(step, snaps)
            done.set()

        self.streamer.on_offload_lane(persist)

    def close(self) -> None:
        self.streamer.drain()
        self.streamer.close()
        self.store.close()




class LeanResident:
    """Memory-lean keeper of the resident buckets for the disk tier.

    The embedding bucket (tied to the head) is the largest resident piece: OPT-1.3B's is 0.43 GB
    of fp32. Here it lives in the store between uses: loaded for the embedding, parked in scratch
    files in its +eps and -eps states while the blocks stream, loaded again for the head, restored
    and written back. Its noise is regenerated slab by slab (chunk-aligned, so the same z), so no
    full-size noise buffer exists. Same elementwise arithmetic as :class:`ResidentSet`: bit-equal.
    """

    def __init__(self, engine, store: DiskStore, slab_chunks: int = 8):

        self.engine, self.store, self.adapter = engine, store, engine.adapter
        self.bin = self.adapter.bucket_in
        self.out = ResidentSet(engine, [self.adapter.bucket_out])  # the small out bucket stays in memory
        self.slab = engine.zo.chunk_size * slab_chunks
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
        m = self.bin.master
        for a in range(0, m.numel(), self.slab):
            z = self.engine.perturber.fill(self._z[: min(self.slab, m.numel() - a)], seed, self.bin.key, start=a)
            fn(m[a : a + z.numel()], z)
        self.bin.sync()

    def _pending(self) -> None:
        p, e = self.engine.pending, self.engine
        if p is None:
            return
        with e._span("update"):
            if e.zo.weight_decay:
                keep = 1.0 - p.lr * e.zo.weight_decay
                for a, b in self.bin.decay_spans:
                    self.bin.master[a:b].mul_(keep)
            self._noise(p.seed, lambda m, z: m.add_(z, alpha=-p.lr * p.grad))

    # -- the ResidentSet interface -----------------------------------------------------------
    def flush(self) -> None:
        self.out.flush()
        self._load()
        self._pending()
        self._write_back()
        self._unload()

    def begin(self, seed: int, ids, mask):
        e, a, eps = self.engine, self.adapter, self.engine.zo.eps
        self._seed = seed
        self.out.to_plus(seed)
        self._load()
        self._pending()
        with e._span("rng"):
            self._noise(seed, lambda m, z: perturb_(m, z, eps))
        plus, minus = e.signs
        with e._span("embed"):
            h_plus, ctx = a.embed(ids, mask) if plus else (None, None)  # (B, T, C)
        if plus:
            self.store.stash("plus", self.bin.working)
        self._noise(seed, lambda m, z: perturb_(m, z, -2 * eps))
        self.out.to_minus()
        with e._span("embed"):
            h_minus, ctx = a.embed(ids, mask) if minus else (None, ctx)  # (B, T, C)
        self.store.stash("minus", self.bin.master)
        self._unload()
        return h_plus, h_minus, ctx

    def end(self, h_plus, h_minus, labels) -> tuple[float, float]:
        e, a, eps = self.engine, self.adapter, self.engine.zo.eps
        with e._span("head"):  # one embedding matrix in memory at a time
            loss_minus = loss_plus = None
            if h_minus is not None:
                self._attach(self.store.unstash("minus", self.bin.numel).to(e.device))
                loss_minus = float(a.loss(a.head(h_minus), labels))
                self._unload()
            self.out.bind_plus()
            if h_plus is not None:
                self.bin.bind(self.store.unstash("plus", self.bin.numel, self.bin.working_dtype).to(e.device))
                loss_plus = float(a.loss(a.head(h_plus), labels))
                self.bin.unbind()
        self.out.restore()
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

    def head_loss(self, h, labels) -> float:
        self._load()
        loss = float(self.adapter.loss(self.adapter.head(h), labels))
        self._unload()
        return loss
