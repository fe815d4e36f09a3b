"""Every config field is validated with one clear error and wired to an observable effect."""
import dataclasses

import pytest

from distzo2_lab.config import ConfigError, OffloadConfig, PrecisionConfig, TrainConfig, ZOConfig, validate

BASE = TrainConfig(steps=2, batch_size=2, seq_len=12, threads=1, zo=ZOConfig())


def with_field(path: str, value) -> TrainConfig:
    if "." in path:
        outer, inner = path.split(".")
        return dataclasses.replace(BASE, **{outer: dataclasses.replace(getattr(BASE, outer), **{inner: value})})
    return dataclasses.replace(BASE, **{path: value})


BAD = {
    "model": ("", "model=''"),
    "steps": (0, "steps=0 is not valid; it must be a positive integer"),
    "seed": (-1, "seed=-1"),
    "batch_size": (0, "batch_size=0"),
    "seq_len": (1, "seq_len=1 is not valid"),
    "micro_batches": (3, "micro_batches=3 does not divide batch_size=2; choose one of 1, 2"),
    "engine": ("adam", "engine='adam' is not valid; choose one of zo2, eager"),
    "task": ("glue", "task='glue' is not valid; choose one of synthetic, text"),
    "data": ("x.txt", "data='x.txt' is only read by task='text'"),
    "shots": (0, "shots=0 is not valid; it must be a positive integer"),
    "threads": (0, "threads=0"),
    "device": ("tpu", "device='tpu' is not valid; choose one of cpu, cuda"),
    "zo": (ZOConfig(eps=0.0), "zo.eps=0.0 is not valid; it must be a positive finite number"),
    "precision": (PrecisionConfig(compute="int8"), "precision.compute='int8' is not valid; choose one of fp32"),
    "zo.lr": (-1.0, "zo.lr=-1.0"),
    "zo.eps": (-1e-3, "zo.eps=-0.001"),
    "zo.weight_decay": (-0.1, "zo.weight_decay=-0.1"),
    "zo.noise": ("uniform", "zo.noise='uniform' is not valid; choose one of gaussian, rademacher"),
    "zo.directions": (0, "zo.directions=0 is not valid; it must be a positive integer"),
    "zo.perturb": ("inplace", "zo.perturb='inplace' is not valid; choose one of auto, in-place, copy"),
    "zo.freeze": (("",), "zo.freeze=('',) is not valid; it must be a tuple of non-empty glob patterns"),
    "zo.optimizer": ("lion", "zo.optimizer='lion' is not valid; choose one of sgd, momentum, adam"),
    "zo.perturbation": ("blocky", "zo.perturbation='blocky' is not valid; choose one of dense, gaussian"),
    "zo.estimator": ("three-point", "zo.estimator='three-point' is not valid; choose one of two-point, one-sided"),
    "zo.momentum": (1.0, "zo.momentum=1.0 is not valid; it must be in [0, 1)"),
    "zo.adam_beta1": (-0.1, "zo.adam_beta1=-0.1 is not valid; it must be in [0, 1)"),
    "zo.adam_beta2": (1.5, "zo.adam_beta2=1.5 is not valid; it must be in [0, 1)"),
    "zo.adam_eps": (0.0, "zo.adam_eps=0.0 is not valid; it must be a positive finite number"),
    "zo.hessian_smooth": (1.0, "zo.hessian_smooth=1.0 is not valid; it must be in (0, 1)"),
    "zo.lowrank_interval": (0, "zo.lowrank_interval=0 is not valid; it must be a positive integer"),
    "zo.sparse_refresh": (-1, "zo.sparse_refresh=-1 is not valid; it must be an integer >= 0"),
    "precision.compute": ("fp8", "precision.compute='fp8'"),
    "precision.storage": ("int4", "precision.storage='int4' is not valid; choose one of fp32, bf16, fp16"),
    "precision.master": ("fp64", "precision.master='fp64' is not valid; choose one of fp32, bf16, none"),
    "offload": (OffloadConfig(tier="ssd"), "offload.tier='ssd' is not valid; choose one of resident, host, disk"),
    "offload.tier": ("gpu", "offload.tier='gpu' is not valid"),
    "offload.prefetch": (-1, "offload.prefetch=-1 is not valid; it must be an integer >= 0"),
    "offload.store": ("/tmp/s", "offload.store='/tmp/s' is only used by offload.tier='disk'"),
    "offload.link_gbps": (0.0, "offload.link_gbps=0.0 is not valid"),
    "offload.lean": (True, "offload.lean=True parks the embeddings in the disk store; offload.tier='resident'"),
    "peft": ("lora:0", "peft='lora:0' is not valid; choose 'lora:R' (LoRA adapters of rank R) or 'prefix:N'"),
}


def all_fields():
    out = []
    for f in dataclasses.fields(TrainConfig):
        out.append(f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
    return out


def test_every_field_has_a_bad_value_case_and_an_effect_case():
    assert set(all_fields()) == set(BAD) == set(EFFECT) | {"zo", "precision", "offload"}


@pytest.mark.parametrize("path", list(BAD))
def test_invalid_field_raises_one_clear_error(path):
    value, message = BAD[path]
    with pytest.raises(ConfigError) as e:
        validate(with_field(path, value))
    assert message in str(e.value)


def _summary(cfg: TrainConfig, tmp_path=None) -> dict:
    from distzo2_lab.run.train import train

    return train(cfg, progress=False)


# field -> (new value, predicate(base summary, changed summary))
EFFECT = {
    "model": ("opt-125m", None),  # covered by test_model_field_selects_the_preset (too big to train here)
    "steps": (3, lambda a, b: len(b["steps"]) == 3),
    "seed": (1, lambda a, b: a["digest"] != b["digest"] and a["steps"][0]["seed"] != b["steps"][0]["seed"]),
    "batch_size": (3, lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    "seq_len": (16, lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    # two micro-batches: the same loss up to float order, a different reduction
    "micro_batches": (2, lambda a, b: abs(a["steps"][0]["loss_plus"] - b["steps"][0]["loss_plus"]) < 1e-5
                      and b["config"]["micro_batches"] == 2),
    "engine": ("eager", lambda a, b: a["steps"] == b["steps"] and b["config"]["engine"] == "eager"),
    "task": ("text", None),  # covered in test_tasks.py (needs data)
    "data": (None, None),  # covered in test_tasks.py
    "shots": (16, None),  # test_sst2.py: k-shot sampling sizes and a k-shot training run
    "threads": (2, lambda a, b: a["digest"] == b["digest"]),  # same numbers, more threads
    "device": ("cpu", None),  # test_cuda_device_is_refused_without_cuda; tests/test_gpu.py on a GPU
    "zo.lr": (1e-2, lambda a, b: a["steps"][0]["loss_plus"] == b["steps"][0]["loss_plus"]
              and a["digest"] != b["digest"]),
    "zo.eps": (1e-2, lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    "zo.weight_decay": (0.5, lambda a, b: a["steps"][0] == b["steps"][0] and a["digest"] != b["digest"]),
    "zo.noise": ("rademacher", lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    "zo.directions": (2, lambda a, b: a["steps"][0]["seed"] == b["steps"][0]["seed"]
                      and a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    # in place: l+ of the same theta + eps z (up to the rounding of the add), then the round trip's
    "zo.perturb": ("in-place", lambda a, b: abs(a["steps"][0]["loss_plus"] - b["steps"][0]["loss_plus"]) < 1e-5
                   and a["digest"] != b["digest"]),
    "zo.freeze": (("*embed_tokens*",), lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]
                  and list(b["config"]["zo"]["freeze"]) == ["*embed_tokens*"]),
    "precision.compute": ("bf16", lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    "precision.storage": ("bf16", None),  # needs compute=bf16: test_precision.py
    "precision.master": ("none", None),  # refusal and fp32 master: test_precision.py
    "offload.tier": ("host", lambda a, b: a["steps"] == b["steps"] and a["digest"] == b["digest"]
                     and b["config"]["offload"]["tier"] == "host"),
    "offload.prefetch": (3, None),  # test_offload.py: working-memory bound and identical results
    "offload.store": ("dir", None),  # test_offload.py: disk tier, reopen, SIGKILL
    "offload.link_gbps": (1.0, None),  # test_offload.py: simulated link stretches transfers
    "offload.lean": (True, None),  # test_offload.py: lean disk tier equals resident, frees the embeddings
    # adapters only: a different function from the first step (lora_B = 0, but lora_A and B move)
    "peft": ("lora:2", lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]
             and b["base"]["peft"] == "lora:2"),
    # the method family: the first losses at theta_0 +- eps z (up to the rounding of the copies), another
    # rule; another z
    "zo.optimizer": ("adam", lambda a, b: abs(a["steps"][0]["loss_plus"] - b["steps"][0]["loss_plus"]) < 1e-5
                     and a["digest"] != b["digest"]),
    "zo.perturbation": ("lowrank:2", lambda a, b: a["steps"][0]["loss_plus"] != b["steps"][0]["loss_plus"]),
    # tests/test_methods.py and tests/test_family_engine.py (each optimiser, perturbation and estimator
    # on the tiny model, the hyper-parameters in the rule tests)
    **{f"zo.{k}": (None, None) for k in ("estimator", "momentum", "adam_beta1", "adam_beta2", "adam_eps",
                                       "hessian_smooth", "lowrank_interval", "sparse_refresh")},
}


@pytest.fixture(scope="module")
def base_summary():
    return _summary(BASE)


@pytest.mark.parametrize("path", [p for p, (_, check) in EFFECT.items() if check is not None])
def test_field_changes_the_run(path, base_summary):
    value, check = EFFECT[path]
    changed = _summary(with_field(path, value))
    assert check(base_summary, changed)


def test_model_field_selects_the_preset():
    from distzo2_lab.run.train import build_adapter

    assert build_adapter({"model": "tiny"}).config.hidden_size == 64
    assert build_adapter({"model": "tiny"}).config.num_hidden_layers == 2


def test_storage_field_sets_the_working_dtype():
    import torch

    from distzo2_lab.run.train import build_adapter

    a = build_adapter({"model": "tiny"}, storage="bf16")
    assert a.blocks[0].working.dtype == torch.bfloat16 and a.blocks[0].master.dtype == torch.float32


def test_cuda_device_is_refused_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: tests/test_gpu.py covers device='cuda'")
    with pytest.raises(ConfigError, match="device='cuda' but torch sees no CUDA device"):
        validate(with_field("device", "cuda"))


def test_offload_combinations_are_refused_with_the_fields_named():
    with pytest.raises(ConfigError, match="offload.tier='disk' needs offload.store=DIR"):
        validate(with_field("offload", OffloadConfig(tier="disk")))
    with pytest.raises(ConfigError, match="offload.link_gbps simulates the transfers"):
        validate(with_field("offload", OffloadConfig(link_gbps=1.0)))
    with pytest.raises(ConfigError, match="engine='eager' is the resident reference"):
        validate(dataclasses.replace(BASE, engine="eager", offload=OffloadConfig(tier="host")))
