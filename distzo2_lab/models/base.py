"""The generic adapter: any Hugging Face model seen as ZO2 sees it.

ZO2 (arXiv 2503.12668, Sec. 3.1) splits a model into resident-in modules (embeddings), N
homogeneous blocks that stream, and resident-out modules (final norm, head). A family (opt.py,
gpt2.py, llama.py, bert.py) names the modules of each group and calls them the way its stock
forward does; this class builds the flat buckets (a tied weight counted once), runs every block
through one shell layer when the blocks live in a store, and owns the losses: next-token
cross-entropy, or MeZO's prompt-based classification (arXiv 2305.17333, Sec. 3: cross-entropy
over the logits of the label words only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distzo2_lab.config import ConfigError
from distzo2_lab.models.buckets import ParamBucket

TABLE = "prompt_encoder.default.embedding.weight"  # a peft prefix table's name in the PeftModel

# (bucket key, [(parameter-name prefix, module or None)]) for "in", "block.0" ... "block.N-1", "out"
Groups = list[tuple[str, list[tuple[str, nn.Module | None]]]]


def unique_params(modules: list[tuple[str, nn.Module | None]], seen: set[int]) -> list[tuple[str, nn.Parameter]]:
    """(full name, parameter) of each parameter not yet in `seen` (a tied weight counts once)."""
    out = []
    for prefix, mod in modules:
        if mod is None:
            continue
        for pname, p in mod.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"{prefix}.{pname}" if prefix else pname, p))
    return out


def is_norm(mod: nn.Module) -> bool:
    """LayerNorm or RMSNorm, whatever a family calls its class (``LlamaRMSNorm``, ``LayerNorm``)."""
    name = type(mod).__name__
    return isinstance(mod, nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name


def init_group_(modules: list[tuple[str, nn.Module | None]], std: float, seed: int, done: set[int]) -> None:
    """Seeded init of one bucket's modules (N(0, std) weights, zero biases, unit norms, zero padding
    row), from its own generator, so any block can be built alone. Parameters in `done` (a tied
    weight initialised by an earlier bucket) are left alone."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed Linear

    gen = torch.Generator().manual_seed(seed)

    def normal_(p: nn.Parameter) -> bool:
        if id(p) in done:
            return False
        done.add(id(p))
        p.normal_(0.0, std, generator=gen)  # in place: no model-sized temporary
        return True

    for _, mod in modules:
        for sub in mod.modules() if mod is not None else ():
            if isinstance(sub, nn.Embedding):
                if normal_(sub.weight) and sub.padding_idx is not None:
                    sub.weight[sub.padding_idx].zero_()
            elif isinstance(sub, (nn.Linear, Conv1D)):
                normal_(sub.weight)
            elif not is_norm(sub):
                continue
            if is_norm(sub) and getattr(sub, "weight", None) is not None and id(sub.weight) not in done:
                sub.weight.fill_(1.0)
            if getattr(sub, "bias", None) is not None and id(sub.bias) not in done:
                sub.bias.zero_()


def restore_buffers_(model: nn.Module) -> None:
    """Give every buffer of a meta-built model its value (BERT's position ids, LLaMA's rotary
    frequencies): meta tensors and `to_empty` leave them without one. Uses the model's own init."""
    for mod in model.modules():
        bufs = list(mod.buffers(recurse=False))
        if not bufs:
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            raise NotImplementedError(f"{type(mod).__name__} holds both parameters and buffers")
        if any(b.is_meta for b in bufs):
            mod.to_empty(device="cpu", recurse=False)
        model._init_weights(mod)


@dataclass
class BlockContext:
    """What every block needs besides the hidden states (same for +eps and -eps passes)."""

    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # rotary (cos, sin)
    masks: dict | None = None  # attention type -> mask, for families that mix them
    prefix: torch.Tensor | None = None  # prefix tuning: the table (N, layers * 2 * H_kv * D) as this pass saw it


class BlockAdapter:
    """resident-in bucket, one bucket per block, resident-out bucket, and the loss.

    A family subclass sets `family` (the config's model_type), `model_class` (the Hugging Face
    class its presets build) and implements `groups`, `block_modules`, `block_prefix`, `embed`,
    `run_block` and `head`. `choices` (None, or a LongTensor (K,) of label-word ids) switches the
    causal-LM loss to cross-entropy over those K logits. `prefix` (a ``peft`` prefix table's
    module, models/prefix.py) joins the resident-in bucket; a family that passes each layer's
    slice of it to its block sets `takes_prefix` (and `attention`, the block's attention module's
    name, whose ``layer_idx`` says where in a cache the layer reads); a family that cannot take
    one says why in `no_prefix`.
    """

    family = ""
    model_class: type | None = None
    causal = True  # next-token loss on (B, T) labels; False: one label per sequence (B,)
    wrapper: nn.Module | None = None  # the ``peft`` model around `model`, when adapter_for was given one
    frozen: tuple[str, ...] = ()  # zo.freeze patterns of what the wrapper does not train (lora.frozen_patterns)
    takes_prefix = False  # run_block passes a prefix table's layer slice to the block
    no_prefix = ""  # why a family without takes_prefix cannot take a prefix (one clause)
    attention = "self_attn"  # the block's attention module (its layer_idx places a prefix in a cache)

    def __init__(self, model: nn.Module, storage: str = "fp32", prefix: nn.Embedding | None = None):
        model.eval().requires_grad_(False)
        self.model = model
        self.config = model.config
        self.layers = list(self.block_modules(model))
        self.choices: torch.Tensor | None = None
        self.prefix = prefix
        if prefix is not None:
            prefix.requires_grad_(False)
            self._check_prefix(prefix.weight)
        seen: set[int] = set()
        plan = self.groups(model)
        if prefix is not None:  # the table is resident with the embeddings: perturbed and updated as they are
            plan[0] = (plan[0][0], [*plan[0][1], (TABLE.rsplit(".", 1)[0], prefix)])
        groups = [(key, unique_params(mods, seen)) for key, mods in plan]
        norms = {id(p) for _, mods in self.groups(model) for _, m in mods if m is not None
                 for sub in m.modules() if is_norm(sub) for p in sub.parameters(recurse=False)}
        # blocks on the meta device live in a store; the shell (block 0) then holds no master either,
        # so building never holds a block's values beside the embeddings'
        self.offloaded = any(p.is_meta for _, params in groups[1:-1] for _, p in params)
        self.bucket_in = ParamBucket(groups[0][0], groups[0][1], storage, norms)
        self.blocks = [ParamBucket(key, params, storage, norms, layout_only=self.offloaded)
                       for key, params in groups[1:-1]]
        self.bucket_out = ParamBucket(groups[-1][0], groups[-1][1], storage, norms)
        if self.offloaded:
            self._use_shell()
        n_model = sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
        n_model += prefix.weight.numel() if prefix is not None else 0
        n_ours = sum(b.numel for b in self.buckets)
        if n_model != n_ours:
            raise RuntimeError(f"adapter covers {n_ours} of {n_model} parameters")

    def _use_shell(self) -> None:
        """Blocks live in a store (ZO2's offloading): every block runs through one materialised
        shell module whose parameters are re-pointed at the working buffer of the visit."""
        shell = self.layers[0]
        if any(p.is_meta for p in shell.parameters()):
            raise RuntimeError("an offloaded adapter needs block 0 materialised as the block shell")
        self.check_shell()
        self.layers = [shell] * len(self.layers)
        shell_params = dict(shell.named_parameters())
        for i, b in enumerate(self.blocks):
            b.detach()  # block 0 too: its values come from the store like every other block's
            prefix = self.block_prefix(i) + "."
            for slot in b.slots:
                slot.param = shell_params[slot.name[len(prefix):]]
        self.blocks[0].unbind()  # the shell holds nothing between visits

    # -- family hooks -------------------------------------------------------------------
    @staticmethod
    def groups(model: nn.Module) -> Groups:
        """The bucket plan: (key, [(parameter-name prefix, module)]) for in, block.0..N-1, out."""
        raise NotImplementedError

    @staticmethod
    def block_modules(model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    @staticmethod
    def block_prefix(i: int) -> str:
        """Parameter-name prefix of block i (``model.decoder.layers.3``)."""
        raise NotImplementedError

    def check_shell(self) -> None:
        """Refuse an offloaded run when the blocks are not interchangeable (one shell runs them all)."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Resident-in modules: tokens (B, T) -> (hidden (B, T, C), BlockContext)."""
        raise NotImplementedError

    def run_block(self, i: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        """Resident-out modules: hidden (B, T, C) -> logits. `ctx` is what embed() returned (an
        encoder's pooling reads its padding mask)."""
        raise NotImplementedError

    @staticmethod
    def init_std(config) -> float:
        std = getattr(config, "init_std", None)
        return std if std is not None else config.initializer_range

    # -- generic ------------------------------------------------------------------------
    @property
    def buckets(self) -> list[ParamBucket]:
        """Every bucket in canonical order: in, block.0 ... block.N-1, out."""
        return [self.bucket_in, *self.blocks, self.bucket_out]

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def prefix_heads(self) -> tuple[int, int]:
        """(key/value heads, head dim) of a layer's prefix: ``peft`` sizes the table with
        num_key_value_heads * head_dim where the config has them (grouped-query attention)."""
        c = self.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def _check_prefix(self, table: torch.Tensor) -> None:
        heads, dim = self.prefix_heads()
        want = len(self.layers) * 2 * heads * dim
        if table.dim() != 2 or table.shape[1] != want:
            raise ConfigError(f"a prefix table of shape {tuple(table.shape)} does not fit model_type={self.family!r}: "
                              f"each row holds layers * 2 * key/value heads * head_dim = {len(self.layers)} * 2 * "
                              f"{heads} * {dim} = {want} values")

    def prefix_now(self) -> torch.Tensor | None:
        """A copy of the prefix table as it is now (None without one): the in-place step perturbs
        the table again before the blocks run, so each pass keeps the values it embedded with."""
        return None if self.prefix is None else self.prefix.weight.detach().clone()  # (N, layers * 2 * H_kv * D)

    def check_batch(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ConfigError(f"input_ids must be a non-empty (batch, seq) tensor, got {tuple(input_ids.shape)}")
        n = 0 if self.prefix is None else self.prefix.weight.shape[0]  # a prefix's positions come first
        if input_ids.shape[1] + n > self.max_positions:
            with_prefix = f" plus the prefix's {n} positions" if n else ""
            raise ConfigError(f"seq_len={input_ids.shape[1]}{with_prefix} is longer than the model's "
                              f"max_position_embeddings={self.max_positions}")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32 (label -100 ignored); with `choices`, the
        cross-entropy over the K label words' logits at each position whose next label is set."""
        if labels.dim() != 2:
            raise ConfigError(f"a causal LM takes labels (batch, seq), got shape {tuple(labels.shape)}")
        if self.choices is None:
            v = logits.shape[-1]
            shift = logits[:, :-1].reshape(-1, v).float()  # (B*(T-1), V)
            return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)
        choices = self.choices.to(logits.device)  # (K,)
        nxt = labels[:, 1:]  # (B, T-1) the token each position predicts
        keep = nxt != -100
        scores = logits[:, :-1][keep][:, choices].float()  # (N, K)
        match = nxt[keep].unsqueeze(1) == choices.unsqueeze(0)  # (N, K)
        if not bool(match.any(1).all()):
            bad = nxt[keep][~match.any(1)].unique().tolist()
            raise ConfigError(f"labels hold token ids {bad} that are not in choices={choices.tolist()}")
        return F.cross_entropy(scores, match.int().argmax(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Block-by-block logits with the current parameters."""
        hidden, ctx = self.embed(input_ids, attention_mask)
        for i in range(len(self.layers)):
            hidden = self.run_block(i, hidden, ctx)
        return self.head(hidden, ctx)

    def buffers_to(self, device: str | torch.device) -> None:
        """Move the model's buffers (BERT's position ids, rotary frequencies) to `device`; the
        parameters move with the buckets (an offloaded model's blocks 1.. have no storage)."""
        for mod in self.model.modules():
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None and not buf.is_meta:
                    mod._buffers[name] = buf.to(device)

    # -- construction: meta model, materialised groups, per-block init ---------------------
    @classmethod
    def tie_(cls, model: nn.Module) -> None:
        """Re-tie the head to the input embeddings after `to_empty` split them (config permitting)."""
        out = model.get_output_embeddings()
        if out is not None and getattr(model.config, "tie_word_embeddings", False):
            out.weight = model.get_input_embeddings().weight

    @classmethod
    def materialise(cls, model: nn.Module, keep=lambda key: True) -> Groups:
        """Give real, untouched CPU storage to the groups whose key passes `keep` (everything else
        stays on the meta device); returns those groups. Buffers get their values."""
        groups = [(k, mods) for k, mods in cls.groups(model) if keep(k)]
        for _, modules in groups:  # allocate everything first: to_empty on a tied module rewrites the shared weight
            for _, mod in modules:
                if mod is not None:
                    mod.to_empty(device="cpu", recurse=True)
        cls.tie_(model)
        restore_buffers_(model)
        return groups

    @classmethod
    def meta_model(cls, config) -> nn.Module:
        """The family's model on the meta device with the resident modules and block 0 (the shell)
        given real, still untouched storage: nothing is initialised twice."""
        with torch.device("meta"):
            m = cls.model_class(config)
        cls.materialise(m, lambda k: not k.startswith("block.") or k == "block.0")
        return m.eval()

    def new_block(self) -> nn.Module:
        """A private, materialised block of this model's shape (for generating block values)."""
        with torch.device("meta"):
            block = type(self.layers[0])(self.config, layer_idx=0)
        return block.to_empty(device="cpu")
