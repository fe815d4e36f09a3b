"""Everything a run can refuse before it starts a worker or trains a step.

A bad flag, model name, layout, data file, seed log, checkpoint or output directory found after
the ranks have started (or after the last step) costs the user the work done so far and shows a
worker's traceback; found here it is one :class:`ConfigError` line. Each check is the same one
the run makes later (or a cheap read of the same file), so the two cannot disagree.
"""
from __future__ import annotations

import os

from distzo2_lab.config import SUITE_TASKS, ConfigError, TrainConfig, validate
from distzo2_lab.models.presets import checkpoint_config, is_local_dir, preset_config
from distzo2_lab.run.checkpoint import SeedLog, check_checkpoint
from distzo2_lab.run.outputs import check_writable


def check_model(cfg: TrainConfig) -> None:
    """The model exists (a preset or a checkpoint directory) and its position table fits seq_len."""
    mc = checkpoint_config(cfg.model) if is_local_dir(cfg.model) else preset_config(cfg.model)
    limit = getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than the model's max_position_embeddings={limit}")


def check_data(cfg: TrainConfig) -> None:
    """The data file (task='text') or a suite task's training file reads, line by line."""
    if cfg.task == "text":
        from distzo2_lab.data.tasks import read_text

        read_text(cfg.data)
    elif cfg.task == "sst2":
        from distzo2_lab.data.sst2 import read_tsv, split_file

        read_tsv(split_file(cfg.data, "train"))
    elif cfg.task in SUITE_TASKS:
        from distzo2_lab.data.suite import read_split

        read_split(cfg.task, cfg.data, "train")


def check_layout(cfg: TrainConfig, layout) -> None:
    """What a distributed layout needs of the rest of the config (the layout's own checks are
    parallel.layout.validate_layout)."""
    if layout is None:
        return
    if layout.slice and cfg.offload.tier == "resident":
        raise ConfigError("--slice (layout slice=True) moves shards of offloaded blocks: add --offload host "
                          "or --offload disk --store DIR (offload.tier='resident' moves no shards)")
    if layout.world_size > 1 and cfg.engine != "zo2":
        raise ConfigError(f"engine={cfg.engine!r} is the one-rank reference; a distributed layout runs engine='zo2'")


def check_store(cfg: TrainConfig) -> None:
    """A disk store that holds a run: its seed log reads, its rule matches, steps go beyond it."""
    if cfg.offload.tier != "disk" or not cfg.offload.store:
        return
    if os.path.exists(cfg.offload.store) and not os.path.isdir(cfg.offload.store):
        raise ConfigError(f"offload.store={cfg.offload.store!r} is a file, not a directory")
    path = os.path.join(cfg.offload.store, "seedlog.jsonl")
    if os.path.exists(path):
        log = SeedLog.read(path, torn_tail=True)
        if log.records and log.records[-1]["step"] >= cfg.steps:  # the run would refuse it too
            raise ConfigError(f"steps={cfg.steps} is not beyond the step {log.records[-1]['step'] + 1} already "
                              f"trained in the store {cfg.offload.store!r}; raise --steps to continue it")
    else:
        check_writable(cfg.offload.store, "store")


def preflight(cfg: TrainConfig, layout=None, out: str | None = None, save: str | None = None,
              resume: str | None = None) -> None:
    """Refuse now what the run would refuse later: config, model, data, layout, store, checkpoint,
    and output directories (created, probed with a written file, the probe removed)."""
    validate(cfg)
    check_model(cfg)
    check_layout(cfg, layout)
    check_data(cfg)
    check_store(cfg)
    if resume is not None:
        state = check_checkpoint(resume)
        if not isinstance(state.get("config"), dict) or "model" not in state["config"]:
            raise ConfigError(f"checkpoint {resume!r}: state.json has no run config")
    for path, field in ((out, "out"), (save, "save")):
        if path is not None:
            check_writable(path, field)
