"""Every fast path in gpart.kernels equals the reference (gpart.partition, gpart.functional).

- ids: bit-equal, over D just above a power of two, D exactly a power of two, d = 1, d = D, D = 2^32,
  D > 2^32 (slices near the end), slices crossing tile and thread boundaries.
- gathered values (Delta_W, W0 + Delta_W in fp32/bf16/fp16): bit-equal, DropConnect on and off.
- scatter sums: equal within fp32 reduction tolerance, deterministic, in every accumulation mode.
- fallback: without a compiler the reference runs, with one warning; an explicitly named backend that
  cannot run is an error.
- Triton kernels: run on CPU under Triton's interpreter, and compile for sm_90 without a GPU (slow).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpart.kernels as K
from gpart.functional import DropConnect, TensorSlice, delta, transpose_add
from gpart.kernels import cpu
from gpart.partition import CHUNK, VERSIONS, Partition

slow = pytest.mark.slow

# (seed, D, d, start, length)
ID_CASES = [
    (0, 1, 1, 0, 1),
    (1, 2, 1, 0, 2),
    (2, 3, 2, 0, 3),
    (3, 5, 5, 0, 5),
    (4, 1000, 10, 0, 1000),
    (5, 4097, 4096, 0, 4097),  # just above a power of two: about half the values cycle-walk
    (6, (1 << 20) + 1, 1, 0, 5000),  # d = 1
    (7, (1 << 20) + 1, (1 << 20) + 1, (1 << 20) - 3000, 3001),  # d = D, slice ending at D
    (8, 1 << 16, 1000, 100, 60_000),  # D a power of two: no cycle-walking
    (9, 85_000_000, 131072, 12_345_678, 70_001),  # RoBERTa-base all-linear D; crosses tiles and threads
    (10, 1 << 32, 77_777, (1 << 32) - 50_000, 50_000),  # D = 2^32: the largest narrow (uint32) case
    (11, 1 << 32, (1 << 32) - 1, (1 << 32) - 5000, 5000),  # d just below 2^32
    (12, (1 << 32) + 1, 524_288, (1 << 32) - 20_000, 20_001),  # wide path, positions crossing 2^32
    (13, (1 << 33) + 5, 524_288, (1 << 33) - 30_000, 30_005),  # D > 2^32, slice at the end
    (14, (1 << 40) + 123, (1 << 31) + 11, (1 << 40) - 5000, 5123),  # large d on the wide path
    (15, 3 << 30, (3 << 30) - 7, (3 << 30) - 4000, 4000),
    # contiguous slices long enough for the C++ first-round table (n >= 2 * (2^b + 4096))
    (16, (1 << 20) + 1, 1000, 0, (1 << 20) + 1),  # the whole domain, D = 2^k + 1: heavy cycle-walking
    (17, 1 << 32, 1 << 31, (1 << 32) - 150_000, 150_000),  # b = 16, the largest table; d a power of two
    (18, 3 << 30, 65536, 7, 140_001),  # D not a power of two, b = 16
    (19, (1 << 35) + 3, 1 << 31, (1 << 35) - 5000, 5003),  # wide path, d a power of two
    (20, 85_000_000, 23040, 40_000_000, 100_003),  # d not a power of two (GLUE's d), with the table
    # `mod d` by a single-precision quotient (d <= 2^30, D / d < 2^21) and at the edges of where it applies
    (22, 1 << 32, 2049, (1 << 32) - 150_000, 150_000),  # D / d just below 2^21, the largest values
    (23, 1 << 32, 2047, (1 << 32) - 5000, 5000),  # D / d just above 2^21: the double-precision path
    (24, (1 << 30) + 5, (1 << 30) - 3, (1 << 30) - 3000, 3005),  # d just below 2^30
    (25, (1 << 31) + 7, (1 << 30) + 1, (1 << 31) - 3000, 3007),  # d just above 2^30: double precision
    (26, 6_000_000, 3, 6_000_000 - 5000, 5000),  # tiny d, quotients near 2^21
]
# cases small enough in d for a theta vector
VALUE_CASES = [c for c in ID_CASES if c[2] <= 1 << 21]
DROPS = [None, DropConnect(0.3, (1 << 40) + 17), DropConnect(0.1, 987_654_321_012_345)]


@pytest.fixture(scope="module")
def cpp():
    if not cpu.available():
        pytest.skip(f"C++ kernels unavailable here: {cpu.load_error()}")
    return cpu


@pytest.fixture(scope="module")
def tri():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    return K._triton_module(True)


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def version(request):
    """Both partition versions: saved adapters keep theirs, so every fast path computes each."""
    return request.param


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def delta_flat(theta_s, sl, drop=None):
    return delta(theta_s, sl, drop).reshape(-1)


def delta_at(theta_s, part, positions, drop=None):
    """Delta at global positions (embedding rows), shaped like them."""
    return delta(theta_s, TensorSlice(part, 0, ()), drop, positions=positions)


def accumulate_grad_at(acc, grad, part, positions, drop=None):
    transpose_add(acc, grad, TensorSlice(part, 0, ()), drop, positions=positions)


def merged_weight(theta_s, part, start, base, drop=None, out_dtype=None):
    return delta(theta_s, TensorSlice(part, start, tuple(base.shape)), drop, base=base,
                 dtype=base.dtype if out_dtype is None else out_dtype)


def _ref_delta(theta_s, part, start, n, drop):
    with K.use_backend("reference"):
        return delta_flat(theta_s, TensorSlice(part, start, (n,)), drop)


def _ref_grad(part, start, grad, drop):
    acc = torch.zeros(part.d)
    with K.use_backend("reference"):
        transpose_add(acc, grad, TensorSlice(part, start, tuple(grad.shape)), drop)
    return acc


def _case_id(c):
    return f"seed{c[0]}-D{c[1]}-d{c[2]}-s{c[3]}-n{c[4]}"


# ---- C++: ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ID_CASES, ids=_case_id)
def test_cpp_ids_are_bit_equal(cpp, case, version):
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    assert torch.equal(cpp.ids(part, start, n), part.ids(start, n))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), log_d=st.floats(0, 32), version=st.sampled_from(VERSIONS), data=st.data())
def test_cpp_ids_random_sizes(seed, log_d, version, data):
    if not cpu.available():
        pytest.skip("C++ kernels unavailable")
    D = data.draw(st.integers(1, 2**41))
    d = max(1, min(D, int(2**log_d)))
    n = data.draw(st.integers(0, min(D, 3000)))
    start = data.draw(st.integers(0, D - n))
    part = Partition(seed, D, d, version)
    assert torch.equal(cpu.ids(part, start, n), part.ids(start, n))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), log_D=st.floats(12, 34), log_d=st.floats(0, 32),
       version=st.sampled_from(VERSIONS), data=st.data())
def test_cpp_ids_random_long_slices(seed, log_D, log_d, version, data):
    """Slices long enough for the first-round table, at random sizes and offsets."""
    if not cpu.available():
        pytest.skip("C++ kernels unavailable")
    D = int(2**log_D) + data.draw(st.integers(-3, 3))
    d = max(1, min(D, int(2**log_d)))
    n = data.draw(st.integers(min(D, 140_000), min(D, 200_000)))
    start = data.draw(st.integers(0, D - n))
    part = Partition(seed, D, d, version)
    assert torch.equal(cpu.ids(part, start, n), part.ids(start, n))


def test_cpp_ids_at_arbitrary_positions(cpp, version):
    part = Partition(21, (1 << 33) + 3, 1000, version)
    pos = torch.randint(0, part.D, (4, 777))
    pos[0, :5] = torch.tensor([0, part.D - 1, part.D - 1, 1 << 32, (1 << 32) - 1])
    ref = part.ids_at(pos)
    assert torch.equal(cpp.ids(part, 0, 0, positions=pos), ref)


def test_reference_paths_at_positions_use_the_partitions_version(version):
    """delta_at / accumulate_grad_at (embedding rows) give what the slice paths give, for either version."""
    part = Partition(5, 10_000, 77, version)
    theta_s = torch.randn(part.d)
    positions = torch.arange(300, 500).view(10, 20)
    grad = torch.randn(10, 20)
    sl = TensorSlice(part, 300, (200,))
    a, b = torch.zeros(part.d), torch.zeros(part.d)
    with K.use_backend("reference"):
        assert torch.equal(delta_at(theta_s, part, positions).reshape(-1), delta_flat(theta_s, sl))
        accumulate_grad_at(a, grad, part, positions)
        transpose_add(b, grad.reshape(-1), sl)
    assert torch.equal(a, b)
    assert torch.equal(part.ids_at(positions), part.ids(300, 200))


def test_cpp_ids_same_for_any_thread_count(cpp, threads):
    part = Partition(3, 85_000_000, 131072)
    torch.set_num_threads(1)
    one = cpp.ids(part, 1_000_000, 300_000)
    torch.set_num_threads(2)
    assert torch.equal(cpp.ids(part, 1_000_000, 300_000), one)


def test_cpp_declines_when_d_exceeds_uint32(cpp, version):
    part = Partition(4, (1 << 34) + 1, (1 << 33) + 1, version)
    assert cpp.ids(part, (1 << 34) - 99, 100) is None
    assert cpp.gather(torch.randn(16), part, (1 << 34) - 99, 100) is None


# ---- C++: gather -----------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", DROPS, ids=["nodrop", "drop0.3", "drop0.1"])
@pytest.mark.parametrize("case", VALUE_CASES, ids=_case_id)
def test_cpp_delta_is_bit_equal(cpp, case, drop, version):
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    theta_s = torch.randn(d)
    ref = _ref_delta(theta_s, part, start, n, drop)
    with K.use_backend("cpp"):
        out = delta_flat(theta_s, TensorSlice(part, start, (n,)), drop)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("drop", DROPS[:2], ids=["nodrop", "drop"])
def test_cpp_merged_weight_is_bit_equal(cpp, base_dtype, out_dtype, drop):
    part = Partition(8, 85_000_000, 131072)
    base = (torch.randn(300, 257) * 0.05).to(base_dtype)
    theta_s = torch.randn(part.d) * 1e-3
    start = 5_000_000
    with K.use_backend("cpp"):
        out = merged_weight(theta_s, part, start, base, drop, out_dtype=out_dtype)
    ref = (base.float() + _ref_delta(theta_s, part, start, base.numel(), drop).view(base.shape)).to(out_dtype)
    assert out.shape == base.shape and out.dtype == out_dtype
    assert torch.equal(out, ref)


def test_cpp_merged_weight_special_values(cpp):
    part = Partition(2, 1000, 10)
    theta_s = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e38, -1e38, 1e-40, 3.0, 65504.0])
    base = torch.tensor([1e38, 0.0, -0.0, float("nan"), 1.0, 70000.0, 1e-45, -1.0] * 125).view(10, 100)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        with K.use_backend("cpp"):
            out = merged_weight(theta_s, part, 0, base, None, out_dtype=out_dtype)
        ref = (base.float() + _ref_delta(theta_s, part, 0, 1000, None).view(10, 100)).to(out_dtype)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_cpp_delta_same_for_any_thread_count(cpp, threads):
    part = Partition(3, 85_000_000, 131072)
    theta_s = torch.randn(part.d)
    drop = DROPS[1]
    torch.set_num_threads(1)
    one = cpp.gather(theta_s, part, 77, 400_001, drop=drop)
    torch.set_num_threads(2)
    assert torch.equal(cpp.gather(theta_s, part, 77, 400_001, drop=drop), one)


@slow
@pytest.mark.parametrize("drop", DROPS[:2], ids=["nodrop", "drop"])
def test_cpp_slice_crossing_reference_chunks(cpp, drop):
    """Slices longer than the reference's CHUNK (4M) positions, where its chunking starts over."""
    part = Partition(17, 3 * CHUNK + 12_345, 100_003)
    start, n = 1000, 2 * CHUNK + 77
    theta_s = torch.randn(part.d)
    with K.use_backend("cpp"):
        out = delta_flat(theta_s, TensorSlice(part, start, (n,)), drop)
    assert torch.equal(out, _ref_delta(theta_s, part, start, n, drop))
    grad = torch.randn(n)
    acc = torch.zeros(part.d)
    with K.use_backend("cpp"):
        transpose_add(acc, grad, TensorSlice(part, start, (n,)), drop)
    torch.testing.assert_close(acc, _ref_grad(part, start, grad, drop), rtol=1e-5, atol=1e-4)


# ---- C++: scatter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", DROPS[:2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("case", VALUE_CASES, ids=_case_id)
def test_cpp_grad_equals_reference(cpp, case, drop, version):
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    grad = torch.randn(n)
    ref = _ref_grad(part, start, grad, drop)
    acc = torch.zeros(d)
    with K.use_backend("cpp"):
        transpose_add(acc, grad, TensorSlice(part, start, (n,)), drop)
    # a group sums ~n/d values; fp32 addition order differs from index_add_'s
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-5 * max(1.0, (n / d) ** 0.5))


@pytest.mark.parametrize("gdt", [torch.bfloat16, torch.float16])
def test_cpp_grad_half_precision_input(cpp, gdt):
    part = Partition(6, 85_000_000, 131072)
    grad = torch.randn(512, 300).to(gdt)
    ref = _ref_grad(part, 999, grad, DROPS[1])
    acc = torch.zeros(part.d)
    assert cpp.scatter(acc, grad, part, 999, drop=DROPS[1])
    torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "D,d,n",
    [
        (85_000_000, 4096, 20_000),  # one thread (small slice)
        (85_000_000, 4096, 300_000),  # per-thread private accumulators
        (85_000_000, 1 << 21, 150_000),  # d >> n: groups owned by threads
        ((1 << 33) + 5, 1 << 20, 100_000),  # owner mode on the wide path
    ],
)
def test_cpp_grad_modes_are_deterministic(cpp, threads, D, d, n):
    part = Partition(9, D, d)
    start = D - n - 17
    grad = torch.randn(n)
    torch.set_num_threads(2)
    a, b = torch.zeros(d), torch.zeros(d)
    assert cpp.scatter(a, grad, part, start, drop=DROPS[1])
    assert cpp.scatter(b, grad, part, start, drop=DROPS[1])
    assert torch.equal(a, b)
    torch.testing.assert_close(a, _ref_grad(part, start, grad, DROPS[1]), rtol=1e-5, atol=1e-5)
    if d > n:  # owner mode adds in position order, like a single thread
        torch.set_num_threads(1)
        c = torch.zeros(d)
        assert cpp.scatter(c, grad, part, start, drop=DROPS[1])
        assert torch.equal(a, c)


def test_cpp_grad_accumulates_into_existing_values(cpp):
    part = Partition(1, 1_000_000, 5000)
    acc = torch.randn(part.d)
    expected = acc + _ref_grad(part, 10, torch.ones(200_000), None)
    assert cpp.scatter(acc, torch.ones(200_000), part, 10)
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-4)


# ---- C++: the backward's fused merge + scatter ------------------------------------------------------

FUSED_CASES = [
    (0, 1, 1, 0, 1),
    (5, 4097, 4096, 0, 4097),
    (6, (1 << 20) + 1, 1, 0, 5000),  # d = 1
    (7, (1 << 20) + 1, (1 << 20) + 1, (1 << 20) - 3000, 3001),  # d = D
    (9, 85_000_000, 131072, 12_345_678, 70_001),  # crosses tiles and threads; first-round table
    (16, (1 << 20) + 1, 1000, 0, (1 << 20) + 1),  # D = 2^k + 1: heavy cycle-walking
    (20, 85_000_000, 23040, 40_000_000, 100_003),  # d not a power of two
    (13, (1 << 33) + 5, 524_288, (1 << 33) - 30_000, 30_005),  # wide path
    (21, 85_000_000, 1 << 21, 1000, 150_000),  # d >> n: groups owned by threads (2 threads)
]


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("drop", DROPS[:2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_cpp_merge_scatter_equals_the_two_sweeps(cpp, threads, case, drop, nthreads, version):
    """One sweep gives bit for bit what merged_weight and accumulate_grad give, and equals the reference."""
    torch.set_num_threads(nthreads)
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    theta_s = torch.randn(d) * 1e-2
    base = torch.randn(n) * 0.05
    grad = torch.randn(n)
    acc0 = torch.randn(d)
    a, b = acc0.clone(), acc0.clone()
    merged = cpp.merge_scatter(theta_s, part, start, base, grad, a, drop=drop)
    assert merged is not None and merged.shape == base.shape and merged.dtype == torch.float32
    with K.use_backend("cpp"):
        assert torch.equal(merged, merged_weight(theta_s, part, start, base, drop))
    assert cpp.scatter(b, grad, part, start, drop=drop)
    assert torch.equal(a, b)
    assert torch.equal(merged, base + _ref_delta(theta_s, part, start, n, drop))
    torch.testing.assert_close(a - acc0, _ref_grad(part, start, grad, drop), rtol=1e-5,
                               atol=1e-4 * max(1.0, (n / d) ** 0.5))


@pytest.mark.parametrize(
    "base_dtype,out_dtype,grad_dtype",
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 weights under bf16 autocast
        (torch.float32, torch.float32, torch.bfloat16),
    ],
)
def test_cpp_merge_scatter_half_precision(cpp, base_dtype, out_dtype, grad_dtype):
    part = Partition(8, 85_000_000, 131072)
    base = (torch.randn(300, 257) * 0.05).to(base_dtype)
    grad = torch.randn(300, 257).to(grad_dtype)
    theta_s = torch.randn(part.d) * 1e-3
    acc = torch.zeros(part.d)
    merged = cpp.merge_scatter(theta_s, part, 5_000_000, base, grad, acc, drop=DROPS[1], out_dtype=out_dtype)
    ref = (base.float() + _ref_delta(theta_s, part, 5_000_000, base.numel(), DROPS[1]).view(base.shape)).to(out_dtype)
    assert merged.shape == base.shape and merged.dtype == out_dtype and torch.equal(merged, ref)
    torch.testing.assert_close(acc, _ref_grad(part, 5_000_000, grad, DROPS[1]), rtol=1e-5, atol=1e-5)


def test_merge_scatter_declines_without_doing_anything(cpp):
    part = Partition(8, 85_000_000, 131072)
    theta_s, base, acc = torch.randn(part.d), torch.randn(10, 20), torch.zeros(part.d)
    with K.use_backend("reference"):
        assert K.kernel_for(part, theta_s, base) is None
    assert cpp.merge_scatter(theta_s, part, 0, base, torch.randn(10, 21), acc) is None  # sizes differ
    assert cpp.merge_scatter(theta_s, part, 0, base.double(), torch.randn(10, 20), acc) is None
    assert cpp.merge_scatter(theta_s, part, 0, base, torch.randn(10, 20), acc, out_dtype=torch.float64) is None
    assert torch.equal(acc, torch.zeros(part.d))


# ---- C++: positions (embedding rows) ---------------------------------------------------------------


@pytest.mark.parametrize("drop", DROPS[:2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("D,d", [(50 * 8, 60), (85_000_000, 131072), ((1 << 33) + 5, 524_288)])
def test_cpp_positions_paths_equal_reference(cpp, D, d, drop):
    part = Partition(4, D, d)
    dim = 8
    rows = torch.tensor([0, 3, 7, 49])
    start = D - 50 * dim
    positions = start + rows[:, None] * dim + torch.arange(dim)
    theta_s = torch.randn(d)
    with K.use_backend("reference"):
        ref = delta_at(theta_s, part, positions, drop)
    with K.use_backend("cpp"):
        out = delta_at(theta_s, part, positions, drop)
    assert out.shape == positions.shape and torch.equal(out, ref)
    grad = torch.randn(4, dim)
    a, b = torch.zeros(d), torch.zeros(d)
    with K.use_backend("reference"):
        accumulate_grad_at(a, grad, part, positions, drop)
    with K.use_backend("cpp"):
        accumulate_grad_at(b, grad, part, positions, drop)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_cpp_positions_out_of_range_fall_back(cpp):
    part = Partition(4, 1000, 10)
    bad = torch.tensor([5, 1000, -1])
    assert cpp.gather(torch.randn(10), part, 0, 0, positions=bad) is None
    acc = torch.zeros(10)
    assert not cpp.scatter(acc, torch.ones(3), part, 0, positions=bad)
    assert torch.equal(acc, torch.zeros(10))


# ---- dispatch and fallback -------------------------------------------------------------------------


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(K.ENV, raising=False)
    assert K.get_backend() == "auto"
    monkeypatch.setenv(K.ENV, "Reference")
    assert K.get_backend() == "reference"
    assert K.backend_for("cpu") == "reference"
    with K.use_backend("cpp"):
        assert K.get_backend() == "cpp"
    assert K.get_backend() == "reference"
    monkeypatch.setenv(K.ENV, "fast")
    with pytest.raises(ValueError, match="GPART_KERNELS"):
        K.get_backend()
    with pytest.raises(ValueError):
        K.set_backend("cuda")


def test_theta_needing_autograd_uses_the_reference(cpp):
    part = Partition(1, 1000, 10)
    theta_s = torch.randn(10, requires_grad=True)
    assert K.kernel_for(part, theta_s) is None
    out = delta_flat(theta_s, TensorSlice(part, 0, (1000,)))
    assert out.requires_grad  # the reference's gather is differentiable
    with torch.no_grad():
        assert K.kernel_for(part, theta_s) is not None


def test_unsupported_dtypes_use_the_reference(cpp):
    part = Partition(1, 1000, 10)
    assert K.kernel_for(part, torch.randn(10, dtype=torch.float64)) is None
    assert not cpp.scatter(torch.zeros(10), torch.randn(1000, dtype=torch.float64), part, 0)
    acc = torch.zeros(10)
    transpose_add(acc, torch.ones(1000, dtype=torch.float64), TensorSlice(part, 0, (1000,)))
    assert acc.sum().item() == 1000


@pytest.fixture
def no_cpp(monkeypatch):
    """Pretend that the extension could not be built (as on a machine without a compiler)."""
    monkeypatch.setattr(cpu, "_lib", None)
    error = cpu.KernelBuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
    monkeypatch.setattr(cpu, "_error", error)
    monkeypatch.setattr(K, "_warned", set())
    monkeypatch.delenv(K.ENV, raising=False)
    monkeypatch.setattr(K, "_override", None)
    monkeypatch.setattr(K, "_chosen", {})


def test_without_compiler_auto_falls_back_with_one_warning(no_cpp):
    part = Partition(3, 5000, 50)
    theta_s = torch.randn(50)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernels are unavailable"):
        out = delta_flat(theta_s, TensorSlice(part, 0, (5000,)))
    assert torch.equal(out, theta_s[part.ids(0, 5000)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = torch.zeros(50)
        transpose_add(acc, torch.ones(5000), TensorSlice(part, 0, (5000,)))  # no second warning
    assert torch.equal(acc, part.group_sizes().float())


def test_without_compiler_an_explicit_cpp_choice_is_an_error(no_cpp):
    with K.use_backend("cpp"):
        with pytest.raises(K.KernelUnavailableError, match="no C\\+\\+ compiler"):
            delta_flat(torch.randn(5), TensorSlice(Partition(1, 100, 5), 0, (100,)))
    with K.use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("error")
        delta_flat(torch.randn(5), TensorSlice(Partition(1, 100, 5), 0, (100,)))  # silent


def test_a_failing_compiled_triton_kernel_falls_back_once(monkeypatch):
    """On CUDA under auto, a Triton kernel that fails (e.g. to compile on an untried GPU) is dropped for
    the process with one warning; under GPART_KERNELS=triton the error propagates."""

    class Broken:
        @staticmethod
        def gather(*args, **kwargs):
            raise RuntimeError("PTX too new for this driver")

    monkeypatch.delenv(K.ENV, raising=False)
    monkeypatch.setattr(K, "_override", None)
    monkeypatch.setattr(K, "_warned", set())
    monkeypatch.setattr(K, "_triton_modules", {False: Broken})
    monkeypatch.setattr(K, "_triton_errors", {})
    monkeypatch.setattr(K, "_chosen", {})
    cuda = torch.device("cuda")
    gather = K._guarded(Broken.gather)
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="PTX"):
        gather()
    with pytest.warns(RuntimeWarning, match="Triton kernel failed"):
        assert gather() is None
    assert False not in K._triton_modules and "PTX" in str(K._triton_errors[False])
    with pytest.warns(RuntimeWarning, match="Triton is unavailable"):
        assert K.backend_for(cuda) == "reference"


def test_build_without_compiler_raises(monkeypatch):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    with pytest.raises(cpu.KernelBuildError, match="no C\\+\\+ compiler"):
        cpu.build()


@slow
def test_build_is_cached_and_self_tested(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cpu.build()
    assert path.startswith(str(tmp_path)) and path.endswith(".so")
    mtime = __import__("os").stat(path).st_mtime_ns
    assert cpu.build() == path and __import__("os").stat(path).st_mtime_ns == mtime  # cached
    lib = __import__("ctypes").CDLL(path)
    cpu._declare(lib)
    cpu._self_test(lib)


@slow
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # the AVX2 and the plain (SSE2) builds
def test_portable_builds_are_bit_equal(tmp_path, monkeypatch, march, version):
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 -march values")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("GPART_KERNELS_MARCH", march)
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    lib = cpu.load()  # includes the self-test
    assert "gpart_cpu_" in lib._name and lib._name.startswith(str(tmp_path))
    for seed, D, d, start, n in [c for c in ID_CASES if c[4] >= 1000] + [(5, (1 << 26) + 1, 77, 1 << 20, 100_000)]:
        part = Partition(seed, D, d, version)
        assert torch.equal(cpu.ids(part, start, n), part.ids(start, n))
    part = Partition(9, 85_000_000, 131072)
    theta_s, grad = torch.randn(part.d), torch.randn(200_000)
    assert torch.equal(cpu.gather(theta_s, part, 1234, 200_000, drop=DROPS[1]),
                       _ref_delta(theta_s, part, 1234, 200_000, DROPS[1]))
    acc = torch.zeros(part.d)
    assert cpu.scatter(acc, grad, part, 1234, drop=DROPS[1])
    torch.testing.assert_close(acc, _ref_grad(part, 1234, grad, DROPS[1]), rtol=1e-5, atol=1e-5)


def test_end_to_end_gradients_match_reference(cpp):
    from conftest import MLP
    from peft import get_peft_model

    import gpart

    results = _output_and_theta_grad_by_backend(
        lambda: get_peft_model(MLP(), gpart.GPartConfig(d=37, seed=3, init_scale=0.5, dropout=0.2,
                                                        target_modules=["lin0", "lin1"], partition_bias=True)),
        (6, 10))
    torch.testing.assert_close(results["cpp"][0], results["reference"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["cpp"][1], results["reference"][1], rtol=1e-6, atol=1e-6)


def _output_and_theta_grad_by_backend(make_model, input_shape) -> dict:
    """For the reference and C++ backends: a fresh model's output and dL/dtheta, same seeds."""
    results = {}
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        model = make_model()
        model.train()
        x = torch.randn(*input_shape)
        with K.use_backend(backend):
            torch.manual_seed(1)
            out = model(x)
            out.square().sum().backward()
        results[backend] = (out.detach(), model.base_model.gpart_theta["default"].grad.clone())
    return results


@pytest.mark.parametrize("fused", [True, False], ids=["fused-backward", "two-sweeps"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_linear_backward_paths_match_reference(cpp, threads, monkeypatch, fused, nthreads):
    """LayerProduct's backward with the fused merge + scatter, and with the two-sweep fallback, equals the
    reference: a first layer whose input needs no gradient (no merge at all), a middle layer, DropConnect,
    layers long enough for several tiles and threads."""
    from peft import get_peft_model

    import gpart

    torch.set_num_threads(nthreads)
    calls = []
    real = cpu.merge_scatter

    def spy(*args, **kwargs):
        res = real(*args, **kwargs) if fused else None
        calls.append(res is not None)
        return res

    monkeypatch.setattr(cpu, "merge_scatter", spy)
    monkeypatch.setattr(K, "_chosen", {})  # the kernels are looked up once per backend and device
    results = _output_and_theta_grad_by_backend(
        lambda: get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(300, 257), torch.nn.GELU(), torch.nn.Linear(257, 301)),
            gpart.GPartConfig(d=1031, seed=3, init_scale=0.5, dropout=0.2, target_modules=["0", "2"])),
        (5, 300))
    torch.testing.assert_close(results["cpp"][0], results["reference"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["cpp"][1], results["reference"][1], rtol=1e-5, atol=1e-5)
    # the first layer's input needs no gradient: only the second layer asks for a merged weight
    assert calls == [fused]  # in the cpp run; the reference has no fused kernel


# ---- Triton (interpreter on CPU) -------------------------------------------------------------------

TRITON_CASES = [
    (0, 1, 1, 0, 1),
    (4, 1000, 10, 0, 1000),
    (5, 4097, 4096, 0, 4097),
    (6, (1 << 20) + 1, 1, 0, 1500),
    (7, (1 << 20) + 1, (1 << 20) + 1, (1 << 20) - 1500, 1501),
    (8, 1 << 16, 1000, 100, 2000),
    (9, 85_000_000, 131072, 12_345_678, 2100),
    (10, 1 << 32, 77_777, (1 << 32) - 1500, 1500),
    (12, (1 << 32) + 1, 524_288, (1 << 32) - 1000, 1001),
    (13, (1 << 33) + 5, 524_288, (1 << 33) - 1500, 1505),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_ids_are_bit_equal(tri, case, version):
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    assert torch.equal(tri.ids(part, start, n, device="cpu"), part.ids(start, n))


@pytest.mark.parametrize("drop", DROPS[:2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("case", TRITON_CASES[1::2], ids=_case_id)
def test_triton_gather_and_scatter_equal_reference(tri, case, drop, version):
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    theta_s = torch.randn(d)
    ref = _ref_delta(theta_s, part, start, n, drop)
    assert torch.equal(tri.gather(theta_s, part, start, n, drop=drop), ref)
    base = torch.randn(n).to(torch.bfloat16)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = tri.gather(theta_s, part, start, n, drop=drop, base=base, out_dtype=out_dtype)
        assert torch.equal(out, (base.float() + ref).to(out_dtype))
    grad = torch.randn(n)
    acc = torch.zeros(d)
    assert tri.scatter(acc, grad, part, start, drop=drop)
    torch.testing.assert_close(acc, _ref_grad(part, start, grad, drop), rtol=1e-5, atol=1e-5)


def test_triton_positions_outside_the_domain_do_not_hang(tri):
    part = Partition(3, (1 << 20) + 1, 100)  # domain 2^21: positions beyond it would walk forever
    pos = torch.tensor([5, (1 << 22) + 3, -1, part.D - 1])
    out = tri.gather(torch.ones(100), part, 0, 0, positions=pos)
    assert out.tolist() == [1.0, 0.0, 0.0, 1.0]
    acc = torch.zeros(100)
    assert tri.scatter(acc, torch.ones(4), part, 0, positions=pos)
    assert acc.sum().item() == 2.0


def test_triton_backend_through_functional(tri, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    part = Partition(4, 85_000_000, 131072)
    dim = 8
    positions = 1000 + torch.tensor([0, 3, 9])[:, None] * dim + torch.arange(dim)
    theta_s = torch.randn(part.d)
    drop = DROPS[1]
    with K.use_backend("triton"):
        assert K.backend_for("cpu") == "triton"
        out = delta_flat(theta_s, TensorSlice(part, 500, (40, 30)), drop)
        rows = delta_at(theta_s, part, positions, drop)
        acc = torch.zeros(part.d)
        accumulate_grad_at(acc, torch.ones(3, dim), part, positions, drop)
    assert torch.equal(out, _ref_delta(theta_s, part, 500, 1200, drop))
    with K.use_backend("reference"):
        assert torch.equal(rows, delta_at(theta_s, part, positions, drop))
        ref = torch.zeros(part.d)
        accumulate_grad_at(ref, torch.ones(3, dim), part, positions, drop)
    torch.testing.assert_close(acc, ref)


@slow
def test_triton_kernels_compile_for_hopper_without_a_gpu(tri):
    """Type-check and lower every kernel variant to PTX for sm_90 (no GPU needed), without FMAs."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tk = K._triton_module(False)
    scalars = {n: "i64" for n in tk._SCALARS}
    variants = [
        (tk._ids_kernel, {"pos_ptr": "*i64", "out_ptr": "*i64"}, dict(HAS_POS=1, NARROW=0, WALK=True, IDENTITY=False, GRID=1)),
        (tk._ids_kernel, {"pos_ptr": "*i64", "out_ptr": "*i64"}, dict(HAS_POS=0, NARROW=1, WALK=True, IDENTITY=False, GRID=0)),
        (tk._ids_kernel, {"pos_ptr": "*i64", "out_ptr": "*i64"}, dict(HAS_POS=0, NARROW=1, WALK=True, IDENTITY=False, GRID=1)),
        (tk._gather_kernel, {"pos_ptr": "*i64", "theta_ptr": "*fp32", "base_ptr": "*bf16", "out_ptr": "*i16"},
         dict(HAS_POS=0, HAS_BASE=1, DROP=1, OUT_BF16=1, NARROW=1, WALK=True, IDENTITY=False, GRID=1)),
        (tk._gather_kernel, {"pos_ptr": "*i64", "theta_ptr": "*fp32", "base_ptr": "*fp32", "out_ptr": "*fp32"},
         dict(HAS_POS=1, HAS_BASE=1, DROP=1, OUT_BF16=0, NARROW=0, WALK=True, IDENTITY=False, GRID=0)),
        (tk._scatter_kernel, {"pos_ptr": "*i64", "grad_ptr": "*bf16", "acc_ptr": "*fp32"},
         dict(HAS_POS=0, DROP=1, NARROW=1, WALK=True, IDENTITY=False, GRID=0)),
        (tk._scatter_kernel, {"pos_ptr": "*i64", "grad_ptr": "*fp32", "acc_ptr": "*fp32"},
         dict(HAS_POS=1, DROP=0, NARROW=0, WALK=False, IDENTITY=True, GRID=1)),
    ]
    for kern, ptrs, consts in variants:
        consts = dict(consts, BLOCK=1024)
        names = list(inspect.signature(kern.fn).parameters)
        sig = {n: "constexpr" if n in consts else ptrs.get(n, scalars.get(n, "fp32")) for n in names}
        src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        ptx = compiled.asm["ptx"]
        assert "fma.rn.f32" not in ptx
        assert "shr.s32" not in ptx  # uint32 shifts are logical
