"""The Poisson sampler's randomness is the noise's kind of stream (issue 17): ChaCha20 with a
256-bit key, 53-bit uniforms, a nonce per batch that never repeats, reproducible and secure
samplers differing only in where the key comes from."""
import numpy as np
import pytest
from scipy import stats

from vaultkern.backend import extension
from vaultkern.ops.noise import noise_key
from vaultkern.privacy.sampler_stream import SamplerStream, sampler_key
from vaultkern.privacy.sampling import PoissonBatchSampler

needs_extension = pytest.mark.skipif(extension() is None, reason="needs the compiled extension")


@needs_extension
@pytest.mark.parametrize("draw, start, count", [(0, 0, 1), (3, 5, 37), (2**40 + 7, 13, 200)])
def test_extension_stream_equals_the_torch_reference(draw, start, count):
    stream = SamplerStream.from_seed(11)
    fast = stream.uniforms(draw, start, count)
    reference = stream.uniforms(draw, start, count, reference=True)
    assert fast.shape == (count,) and np.array_equal(fast, reference)
    # a window of the stream is the same words wherever it is cut
    whole = stream.uniforms(draw, 0, start + count)
    assert np.array_equal(whole[start:], fast)


def test_uniforms_have_53_bits_and_are_uniform():
    u = SamplerStream.from_seed(3).uniforms(0, 0, 200_000)
    assert 0.0 <= u.min() and u.max() < 1.0
    ints = u * 2.0**53
    assert np.array_equal(ints, np.floor(ints))
    # a 24-bit (float32) or 32-bit uniform has its low bits all zero; here they are fair coins
    low_bit = (ints.astype(np.uint64) & np.uint64(1)).mean()
    assert abs(low_bit - 0.5) < 0.01
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_no_two_batches_share_a_stream():
    stream = SamplerStream.from_seed(5)
    first = np.concatenate([stream.uniforms(d, 0, 4) for d in range(20_000)])
    assert len(np.unique(first)) == len(first)
    # and the sampler moves to a new nonce for every batch, across passes and resumes
    sampler = PoissonBatchSampler(64, 0.5, 3, seed=5)
    batches = list(sampler) + list(sampler)
    assert sampler.draws == 6 and len({tuple(b) for b in batches}) == 6


def test_keys_come_from_the_seed_or_from_os_urandom():
    assert sampler_key(1) != sampler_key(2) and sampler_key(1) != noise_key(1)
    assert list(PoissonBatchSampler(100, 0.3, 5, seed=9)) == \
        list(PoissonBatchSampler(100, 0.3, 5, seed=9))
    assert list(PoissonBatchSampler(100, 0.3, 5, seed=9)) != \
        list(PoissonBatchSampler(100, 0.3, 5, seed=10))
    # unseeded samplers get a fresh 256-bit key each
    assert PoissonBatchSampler(10, 0.5, 1).stream.key != PoissonBatchSampler(10, 0.5, 1).stream.key


def test_secure_sampler_state_holds_no_key_and_resumes_on_fresh_nonces():
    sampler = PoissonBatchSampler(50, 0.2, 10, secure=True)
    it = iter(sampler)
    [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state["key"] is None and state["draws"] == 4 and state["position"] == 4
    resumed = PoissonBatchSampler(50, 0.2, 10, secure=True)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 6 and resumed.draws == 10
    with pytest.raises(ValueError, match="secure"):
        resumed.load_state_dict(PoissonBatchSampler(50, 0.2, 10, seed=1).state_dict())
    old = dict(state)
    del old["draws"]
    with pytest.raises(ValueError, match="before the ChaCha20 sampler"):
        resumed.load_state_dict(old)


def test_distributed_shares_are_disjoint_poisson_at_rate_q_and_resumable():
    """Each of W ranks keeps its share of one global Poisson batch (same seed, no process
    group needed with rank= and world_size=): shares disjoint, union a Poisson batch, each
    example in a step with probability q (chi-square), a restored rank continues its shares."""
    from vaultkern.privacy.distributed_sampling import DistributedPoissonBatchSampler
    n, q, steps, world = 60, 0.15, 2000, 3
    ranks = [DistributedPoissonBatchSampler(n, q, steps, seed=4, rank=r, world_size=world)
             for r in range(world)]
    single = PoissonBatchSampler(n, q, steps, seed=4)
    counts = np.zeros(n)
    for shares, whole in zip(zip(*ranks), single):
        union = [i for s in shares for i in s]
        assert len(union) == len(set(union)) and sorted(union) == whole
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        counts[union] += 1
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, n) > 1e-4
    again = DistributedPoissonBatchSampler(n, q, steps, seed=4, rank=1, world_size=world)
    it = iter(again)
    [next(it) for _ in range(5)]
    resumed = DistributedPoissonBatchSampler(n, q, steps, seed=99, rank=1, world_size=world)
    resumed.load_state_dict(again.state_dict())
    assert next(iter(resumed)) == next(it)
