"""The partition: bijective, balanced, isometric, stateless, seeded, versioned and frozen."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpart.partition import ALGORITHM, VERSION, VERSIONS, Partition, PartitionError, grid_shape, permute, round_keys

# Golden vectors: ids of 10 positions for fixed (seed, D, d, start) and partition version. If any of these
# changes, every saved adapter silently changes meaning; a new construction must get a new VERSION instead.
GOLDEN = {1: [
    ((0, 1000, 10, 0), [4, 4, 7, 0, 9, 1, 2, 6, 4, 8]),
    ((42, 85_000_000, 131072, 12_345_678), [26222, 14687, 130549, 21928, 128161, 129364, 91302, 18794, 46174, 46148]),
    ((7, 2**33 + 5, 524288, 2**33 - 5), [452876, 84784, 465387, 121092, 363403, 55085, 37758, 255376, 138199, 400726]),
    ((123456789, 23041, 23040, 100), [7076, 15634, 13769, 5418, 7319, 3338, 11854, 4431, 725, 13640]),
], 2: [
    ((0, 1000, 10, 0), [8, 9, 5, 4, 7, 1, 3, 3, 7, 0]),
    ((42, 85_000_000, 131072, 12_345_678), [57894, 59593, 18336, 129865, 37353, 72671, 117459, 86576, 53812, 6265]),
    ((7, 2**33 + 5, 524288, 2**33 - 5), [313667, 337462, 432153, 122830, 399275, 170103, 315739, 488030, 467606, 323538]),
    ((123456789, 23041, 23040, 100), [5025, 17009, 22665, 2939, 5669, 19592, 12807, 12426, 4971, 1538]),
]}
GOLDEN_CASES = [(version, args, ids) for version, cases in GOLDEN.items() for args, ids in cases]


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def version(request):
    return request.param


def test_version_is_named():
    assert (ALGORITHM, VERSION, VERSIONS) == ("feistel-cyclewalk", 2, (1, 2))
    assert Partition(3, 100, 7).describe() == {"algorithm": ALGORITHM, "version": 2, "seed": 3, "D": 100, "d": 7}
    assert Partition(3, 100, 7, 1).describe()["version"] == 1
    with pytest.raises(PartitionError, match="unknown partition version 3"):
        Partition(3, 100, 7, 3)


@pytest.mark.parametrize("version,args,expected", GOLDEN_CASES, ids=[f"v{v}-{a[1]}" for v, a, _ in GOLDEN_CASES])
def test_golden_ids_never_change(version, args, expected):
    seed, D, d, start = args
    assert Partition(seed, D, d, version).ids(start, 10).tolist() == expected


@pytest.mark.parametrize("D", [1, 2, 5, 1000, 2**20, 2**20 + 1, 85_000_000, 2**32, 2**32 + 1, 2**33 + 5, 2**40])
def test_version_2_grid_covers_D_with_less_than_one_row_to_spare(D):
    p, B = grid_shape(D)
    assert (1 << p) * B >= D and (1 << p) * B - D < (1 << p)
    if D <= 2**32:
        assert B <= 2**16  # spread's product (h >> 16) * B fits 32 bits in the kernels' narrow path


@pytest.mark.parametrize("D", [1, 2, 3, 5, 16, 17, 1000, 4096, 4097, 65537])
def test_permutation_is_a_bijection_of_0_to_D(D, version):
    keys = round_keys(11)
    out = permute(torch.arange(D), D, keys, version)
    assert torch.equal(out.sort().values, torch.arange(D))


@pytest.mark.parametrize("D,d", [(1, 1), (10, 10), (10, 1), (1000, 7), (4097, 4096), (100_003, 999)])
def test_groups_are_balanced_and_match_closed_form(D, d, version):
    p = Partition(5, D, d, version=version)
    counts = torch.bincount(p.ids(0, D), minlength=d)
    assert torch.equal(counts, p.group_sizes())
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    assert counts.sum() == D
    q, r = divmod(D, d)
    assert (counts == q + 1).sum() == r
    torch.testing.assert_close(p.scales(dtype=torch.float64), 1 / counts.double().sqrt())


@pytest.mark.parametrize("D,d", [(12, 3), (50, 50), (97, 13), (300, 1)])
def test_dense_P_is_an_isometry(D, d, version):
    P = Partition(2, D, d, version=version).dense()
    torch.testing.assert_close(P.T @ P, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ((P != 0).sum(1) == 1).all()  # one non-zero per row


def test_ids_of_a_slice_equal_the_slice_of_ids(version):
    p = Partition(9, 10_000, 321, version=version)
    full = p.ids(0, 10_000)
    for start, n in [(0, 1), (17, 100), (4096, 3000), (9_999, 1), (5_000, 0)]:
        assert torch.equal(p.ids(start, n), full[start : start + n])


def test_same_seed_same_ids_and_different_seeds_differ(version):
    a, b, c = (Partition(seed, 50_000, 100, version=version) for seed in (0, 0, 1))
    assert torch.equal(a.ids(0, 50_000), b.ids(0, 50_000))
    assert (a.ids(0, 50_000) != c.ids(0, 50_000)).float().mean() > 0.95


def test_neighbouring_seeds_are_not_shifted_copies(version):
    n, d = 20_000, 1000
    a = Partition(0, n, d, version=version).ids(0, n)
    b = Partition(1, n, d, version=version).ids(0, n)
    for shift in range(-8, 9):
        if shift >= 0:
            same = (a[shift:] == b[: n - shift]).float().mean()
        else:
            same = (a[: n + shift] == b[-shift:]).float().mean()
        assert same < 0.01, f"seed 1 looks like seed 0 shifted by {shift}"


def test_neighbouring_layers_are_not_shifted_copies(version):
    # two equal-sized consecutive tensors: the second must not repeat the first's pattern shifted
    p = Partition(4, 2 * 4096, 512, version=version)
    first, second = p.ids(0, 4096), p.ids(4096, 4096)
    for shift in range(-8, 9):
        x = first[max(shift, 0) : 4096 + min(shift, 0)]
        y = second[max(-shift, 0) : 4096 - max(shift, 0)]
        assert (x == y).float().mean() < 0.02


def test_ids_look_uniform_within_a_tensor(version):
    # adjacent positions land in unrelated groups (no runs of consecutive ids)
    ids = Partition(0, 1_000_000, 10_000, version=version).ids(0, 100_000)
    steps = (ids[1:] - ids[:-1]).abs()
    assert (steps == 1).float().mean() < 0.001


@pytest.mark.parametrize(
    "D,d,match",
    [
        (10, 0, "1 <= d <= D"),
        (10, -3, "1 <= d <= D"),
        (10, 11, "D=10"),
        (0, 1, "at least one target weight"),
        (10, 2.5, "d must be an integer"),
        (10, True, "d must be an integer"),
    ],
)
def test_bad_sizes_raise_clear_errors(D, d, match):
    with pytest.raises(PartitionError, match=match):
        Partition(0, D, d)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "3"])
def test_bad_seed_raises(seed):
    with pytest.raises(PartitionError, match="seed must be an integer"):
        Partition(seed, 10, 2)


def test_slice_outside_domain_raises():
    with pytest.raises(PartitionError, match="outside"):
        Partition(0, 100, 10).ids(95, 10)


def test_large_domain_above_2_pow_32_is_balanced_on_a_window(version):
    # D > 2^32: ids are valid and the permutation stays inside [0, D)
    D, d = 2**33 + 12345, 1 << 19
    p = Partition(3, D, d, version=version)
    keys = list(p.keys)
    pos = torch.arange(D - 5000, D)
    out = permute(pos, D, keys, version)
    assert (out >= 0).all() and (out < D).all()
    assert len(set(out.tolist())) == 5000
    ids = p.ids(D - 5000, 5000)
    assert ((ids >= 0) & (ids < d)).all()


@settings(max_examples=60, deadline=None)
@given(
    D=st.integers(min_value=1, max_value=5000),
    frac=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**63 - 1),
    data=st.data(),
)
@pytest.mark.parametrize("version", VERSIONS)
def test_property_balanced_bijective_and_sliceable(D, frac, seed, data, version):
    d = max(1, min(D, int(round(frac * D))))
    p = Partition(seed, D, d, version=version)
    full = p.ids(0, D)
    counts = torch.bincount(full, minlength=d)
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    assert torch.equal(counts, p.group_sizes())
    start = data.draw(st.integers(min_value=0, max_value=D))
    length = data.draw(st.integers(min_value=0, max_value=D - start))
    assert torch.equal(p.ids(start, length), full[start : start + length])
    assert math.isclose(float((p.scales(dtype=torch.float64) ** 2 * counts).sum()), d, rel_tol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_ids_equal_cpu_ids():
    for version, (seed, D, d, start), _ in GOLDEN_CASES:
        p = Partition(seed, D, d, version)
        n = min(1 << 20, D - start)
        assert torch.equal(p.ids(start, n, device="cuda").cpu(), p.ids(start, n))
