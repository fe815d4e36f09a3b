import pytest
import torch

from distzo2_lab.config import ConfigError
from distzo2_lab.seeds import derive_seed, step_seed
from distzo2_lab.zo.noise import noise_key, noise_reference
from distzo2_lab.zo.perturb import Perturber


def test_noise_is_a_pure_function_of_seed_key_and_range():
    p = Perturber()
    a = p.noise_for(5, "block.0", 4321)
    assert torch.equal(a, p.noise_for(5, "block.0", 4321))
    assert not torch.equal(a, p.noise_for(6, "block.0", 4321))
    assert not torch.equal(a, p.noise_for(5, "block.1", 4321))
    assert derive_seed(1, "k", 2) == derive_seed(1, "k", 2) != derive_seed(1, "k", 3)
    assert step_seed(0, 1) != step_seed(0, 2) and step_seed(0, 1) == step_seed(0, 1)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_any_slice_regenerates_without_the_rest(noise):
    p = Perturber(noise)
    full = p.noise_for(11, "in", 256 * 7 + 100)
    for start, n in [(512, 512), (3, 10), (1001, 800), (256 * 7 + 99, 1)]:
        assert torch.equal(p.noise_for(11, "in", n, start=start), full[start : start + n])
    # the perturber's values are the counter-based definition's
    assert torch.equal(full, noise_reference(noise, noise_key(11, "in"), 0, full.numel()))


def test_perturber_reads_and_changes_no_global_rng_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    Perturber().noise_for(1, "x", 1000)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)  # a different global seed gives the same z
    assert torch.equal(Perturber().noise_for(1, "x", 1000), Perturber().noise_for(1, "x", 1000))


def test_torch_threads_do_not_change_the_noise():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Perturber().noise_for(3, "block.2", 50_000)
        torch.set_num_threads(2)
        two = Perturber().noise_for(3, "block.2", 50_000)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_distributions():
    g = Perturber("gaussian").noise_for(0, "g", 200_000)
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    r = Perturber("rademacher").noise_for(0, "r", 200_000)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01


def test_bad_perturber_arguments_name_the_field():
    with pytest.raises(ConfigError, match="noise='uniform'.*gaussian, rademacher"):
        Perturber("uniform")
    with pytest.raises(ValueError, match="flat contiguous"):
        Perturber().fill(torch.empty(4, 4), 1, "x")
