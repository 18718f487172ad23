"""ex23: signatures_from_hashes, MinHash signatures (the minimum of each hash function over a document's shingles)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np.data.curation.minhash import signatures_from_hashes
from llama3np.exercises.testing import load_fixture

FX = load_fixture("ex23")


def test_matches_the_reference_signatures():
    """Five documents (1 to 2080 shingles, one spanning two chunks), 16 hash functions: equal the reference."""
    sig = signatures_from_hashes(FX["hashes"], FX["offsets"], 16, seed=3)
    assert sig.dtype == np.uint64 and sig.shape == (5, 16), f"signatures {sig.dtype} {sig.shape}, expected uint64 (5, 16)"
    bad = np.argwhere(sig != FX["sig"])
    assert not len(bad), f"document {bad[0][0]}, hash function {bad[0][1]} differs from the reference"


@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_the_signature_of_a_union_is_the_minimum_of_the_signatures(n_a, n_b, seed):
    """sig(A u B) = min(sig(A), sig(B)) entry by entry, and a document's shingle order does not matter."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=n_a, dtype=np.uint64)
    b = rng.integers(0, 2**64, size=n_b, dtype=np.uint64)
    both = np.concatenate([a, b])
    sig = signatures_from_hashes(np.concatenate([a, b, both, both[::-1]]),
                                 np.cumsum([0, n_a, n_b, n_a + n_b, n_a + n_b]), 8, seed=1)
    assert np.array_equal(sig[2], np.minimum(sig[0], sig[1])), "sig(A u B) != min(sig(A), sig(B))"
    assert np.array_equal(sig[2], sig[3]), "the order of a document's shingles changed its signature"
