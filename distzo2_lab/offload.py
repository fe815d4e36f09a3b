"""Assemble an offloaded run: adapter with a block shell, a host or disk store, the streamer.

The blocks of a preset are generated one at a time from their own init seed (the same values a
fully built model has), and a checkpoint directory's blocks are read one at a time from its
safetensors files, so a store is created without the whole model ever being in memory.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from .config import ConfigError, OffloadConfig
from .events import Recorder
from .models import OPTAdapter
from .models.presets import build_model, init_group_, is_local_dir, opt_config
from .perturb import chunk_seed
from .store import DiskStore, HostStore
from .stream import Streamer


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


def build_offloaded(base: dict, storage: str = "fp32") -> tuple[OPTAdapter, callable]:
    """An adapter whose blocks are layout-only, and fill(key, out) giving any bucket's start values."""
    model = base["model"]
    if is_local_dir(model):
        from transformers import OPTConfig, OPTForCausalLM

        reader = _SafetensorsReader(model)
        cfg = OPTConfig.from_pretrained(model, local_files_only=True)
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            m = OPTForCausalLM(cfg)
        dec = m.model.decoder
        for mod in (dec.embed_tokens, dec.embed_positions, dec.project_in, dec.final_layer_norm,
                    dec.project_out, m.lm_head, dec.layers[0]):
            if mod is not None:
                mod.to_empty(device="cpu")
        if cfg.tie_word_embeddings:
            m.lm_head.weight = dec.embed_tokens.weight
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not p.is_meta and not name.startswith("model.decoder.layers."):
                    p.copy_(reader.get(name))
        adapter = OPTAdapter(m.eval(), storage)

        def fill(key: str, out: torch.Tensor) -> None:
            bucket = next(b for b in adapter.buckets if b.key == key)
            _copy_into_bucket(bucket, out, lambda s: reader.get(s.name))
        return adapter, fill

    m = build_model(model, seed=base.get("init_seed", 0), blocks=False)
    # A private fp32 copy of one block generates every block's start values: the adapter's shell
    # gets bound to working buffers (bf16 / fp16 with such storage), which would round them.
    init_block = copy.deepcopy(m.model.decoder.layers[0])
    init_params = dict(init_block.named_parameters())
    adapter, std = OPTAdapter(m, storage), opt_config(model).init_std

    @torch.no_grad()
    def fill(key: str, out: torch.Tensor) -> None:
        bucket = next(b for b in adapter.buckets if b.key == key)
        if not key.startswith("block."):
            out.copy_(bucket.master)
            return
        init_group_([("", init_block)], std, chunk_seed(base.get("init_seed", 0), "init", key), set())
        prefix = f"model.decoder.layers.{key.split('.')[1]}."
        _copy_into_bucket(bucket, out, lambda s: init_params[s.name[len(prefix):]].detach())
    return adapter, fill


class Offload:
    """adapter + store + streamer for one rank, and the helpers training needs around them."""

    def __init__(self, base: dict, offload: OffloadConfig, storage: str = "fp32", device: str = "cpu",
                 recorder: Recorder | None = None):
        self.config = offload
        self.adapter, fill = build_offloaded(base, storage)
        a = self.adapter
        blocks = [(b.key, b.numel) for b in a.blocks]
        if offload.tier == "host":
            self.store = HostStore([k for k, _ in blocks], [n for _, n in blocks], pin=device == "cuda")
            for i, (key, _) in enumerate(blocks):
                fill(key, self.store.blocks[i])
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
                                              base, fill)
            for b in (a.bucket_in, a.bucket_out):  # the committed resident state
                b.master.copy_(self.store.read_resident(b.key))
                b.sync()
            self.resumed_step = self.store.committed
        a = self.adapter
        for b in (a.bucket_in, a.bucket_out):
            b.master = b.master.to(device)
            b.attach(b.master, None if storage == "fp32" else b.master.to(b.working.dtype))
        if device != "cpu":
            for layer in {id(x): x for x in a.layers}.values():
                layer.to(device)
        self.streamer = Streamer(self.store, device, offload.prefetch, recorder, offload.link_gbps)
        self._snap = [torch.empty_like(a.bucket_in.master, device="cpu"),
                      torch.empty_like(a.bucket_out.master, device="cpu")]
        self._committed = None

    def block_values(self, bucket) -> torch.Tensor:
        """A block's current values (after the lanes have drained)."""
        self.streamer.drain()
        i = self.adapter.blocks.index(bucket)
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
        for snap, b in zip(self._snap, (a.bucket_in, a.bucket_out)):
            snap.copy_(b.master)
        done, snaps = self._committed, self._snap

        def persist():
            self.store.commit(step, {"in": snaps[0], "out": snaps[1]})
            done.set()

        self.streamer.on_offload_lane(persist)

    def close(self) -> None:
        self.streamer.drain()
        self.streamer.close()
        self.store.close()


