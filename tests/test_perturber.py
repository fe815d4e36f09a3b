import pytest
import torch

from distzo2_lab.config import ConfigError
from distzo2_lab.seeds import derive_seed, step_seed
from distzo2_lab.zo.perturb import Perturber


def test_noise_is_a_pure_function_of_seed_key_and_range():
    p = Perturber(chunk_size=1000)
    a = p.noise_for(5, "block.0", 4321)
    assert torch.equal(a, p.noise_for(5, "block.0", 4321))
    assert not torch.equal(a, p.noise_for(6, "block.0", 4321))
    assert not torch.equal(a, p.noise_for(5, "block.1", 4321))
    assert derive_seed(1, "k", 2) == derive_seed(1, "k", 2) != derive_seed(1, "k", 3)
    assert step_seed(0, 1) != step_seed(0, 2) and step_seed(0, 1) == step_seed(0, 1)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_chunk_aligned_slice_regenerates_without_the_rest(noise):
    p = Perturber(noise, chunk_size=256)
    full = p.noise_for(11, "in", 256 * 7 + 100)  # short last chunk
    assert torch.equal(p.noise_for(11, "in", 512, start=512), full[512:1024])
    assert torch.equal(p.noise_for(11, "in", 256 * 3 + 100, start=256 * 4), full[256 * 4 :])
    with pytest.raises(ValueError, match="aligned"):
        p.noise_for(11, "in", 10, start=3)
    # a slice ending inside a chunk is refused when the bucket length is known
    with pytest.raises(ValueError, match="neither chunk-aligned .* nor the bucket end"):
        p.noise_for(11, "in", 100, start=512, total=256 * 7 + 100)
    assert torch.equal(p.noise_for(11, "in", 356, start=256 * 7 - 256, total=256 * 7 + 100), full[256 * 6 :])


def test_perturber_reads_and_changes_no_global_rng_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    Perturber(chunk_size=64, threads=2).noise_for(1, "x", 1000)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)  # a different global seed gives the same z
    assert torch.equal(Perturber(chunk_size=64).noise_for(1, "x", 1000),
                       Perturber(chunk_size=64).noise_for(1, "x", 1000))


def test_threads_do_not_change_the_noise():
    one = Perturber(chunk_size=128, threads=1).noise_for(3, "block.2", 5000)
    two = Perturber(chunk_size=128, threads=2).noise_for(3, "block.2", 5000)
    assert torch.equal(one, two)


def test_distributions():
    g = Perturber("gaussian", chunk_size=1 << 16).noise_for(0, "g", 200_000)
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    r = Perturber("rademacher", chunk_size=1 << 16).noise_for(0, "r", 200_000)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01


def test_bad_perturber_arguments_name_the_field():
    with pytest.raises(ConfigError, match="noise='uniform'.*gaussian, rademacher"):
        Perturber("uniform")
    with pytest.raises(ConfigError, match="chunk_size"):
        Perturber(chunk_size=0)
