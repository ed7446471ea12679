"""The projection choices (GPartConfig.projection, column_gain_ratio): Fastfood and the gained,
non-isometric partition, each checked against its dense matrix, through a model's exact gradient,
save/load, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import MLP
from peft import PeftModel, get_peft_model
from test_gradients import CASES, _dense_reference, _logits

import gpart
from gpart.fastfood import MAX_LOG2_L, Fastfood, fwht
from gpart.partition import Partition, PartitionError
from gpart.projection import GainedPartition, make_projection
from gpart.functional import DropConnect, TensorSlice, delta, transpose_add


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_fwht_is_the_hadamard_matrix():
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ _sylvester(16).T)


@pytest.mark.parametrize("D,d", [(64, 8), (50, 5), (1000, 33), (7, 1)])
def test_fastfood_slices_and_transpose_equal_the_dense_matrix(D, d):
    ff = Fastfood(seed=3, D=D, d=d)
    P = ff.dense()
    assert P.shape == (D, d)
    theta = torch.randn(d)
    g = torch.randn(D)
    drop = DropConnect(0.3, 12345)
    for start, n in [(0, D), (0, 1), (D - 1, 1), (D // 3, D - D // 3), (1, max(1, D // 2))]:
        torch.testing.assert_close(ff.delta(theta, start, n), (P[start:start + n] @ theta.double()).float(),
                                   rtol=1e-5, atol=1e-6)
        grad = torch.zeros(d)
        ff.transpose_add(grad, g[start:start + n], start)
        torch.testing.assert_close(grad, (P[start:start + n].T @ g[start:start + n].double()).float(),
                                   rtol=1e-5, atol=1e-6)
        # DropConnect (added by gpart.functional) scales the same positions forward and backward
        sl = TensorSlice(ff, start, (n,))
        keep = drop.keep_scale(torch.arange(start, start + n)).double()
        torch.testing.assert_close(delta(theta, sl, drop), ((P[start:start + n] @ theta.double()) * keep).float(),
                                   rtol=1e-5, atol=1e-6)
        grad = torch.zeros(d)
        transpose_add(grad, g[start:start + n], sl, drop)
        torch.testing.assert_close(grad, (P[start:start + n].T @ (g[start:start + n].double() * keep)).float(),
                                   rtol=1e-5, atol=1e-6)
    positions = torch.randint(0, D, (4, 3))
    torch.testing.assert_close(ff.delta(theta, 0, 0, positions), (P @ theta.double()).float()[positions].reshape(-1),
                               rtol=1e-5, atol=1e-6)
    vals = torch.randn(4, 3)
    grad = torch.zeros(d)
    ff.transpose_add(grad, vals, 0, positions)
    expect = torch.zeros(D, dtype=torch.float64).index_add_(0, positions.reshape(-1), vals.reshape(-1).double())
    torch.testing.assert_close(grad, (P.T @ expect).float(), rtol=1e-5, atol=1e-6)


def _explicit_fastfood(ff: Fastfood) -> torch.Tensor:
    """P built from the definition, matrix by matrix: block b is c * H G_b Pi_b H B_b applied to theta
    zero-padded to L, the blocks stacked and cut to D rows. Only the random draws (signs, Gaussians,
    permutations) come from the projection; the transforms and their order are built here."""
    L, K = ff.L, -(-ff.D // ff.L)
    H = _sylvester(L)
    pad = torch.eye(L, ff.d, dtype=torch.float64)  # theta -> theta zero-padded to L
    blocks = torch.arange(K)
    signs, gauss, perms = ff._signs(blocks).double(), ff._gauss(blocks).double(), ff._perms(blocks)
    rows = []
    for b in range(K):
        B = torch.diag(signs[b])
        Pi = torch.zeros(L, L, dtype=torch.float64)
        Pi[torch.arange(L), perms[b]] = 1.0  # (Pi v)[i] = v[perm[i]]
        G = torch.diag(gauss[b])
        rows.append(ff.c * H @ G @ Pi @ H @ B @ pad)
    return torch.cat(rows)[: ff.D]


@pytest.mark.parametrize("D,d", [(64, 8), (50, 5), (1000, 33), (7, 1)])
def test_fastfood_equals_the_explicit_hadamard_gauss_permutation_product(D, d):
    ff = Fastfood(seed=3, D=D, d=d)
    blocks = torch.arange(-(-D // ff.L))
    signs, gauss, perms = ff._signs(blocks), ff._gauss(blocks), ff._perms(blocks)
    # the random draws are what the definition asks for: signs, permutations, Gaussians of squared norm L
    assert torch.equal(signs.abs(), torch.ones_like(signs))
    assert all(torch.equal(row.sort().values, torch.arange(ff.L)) for row in perms)
    torch.testing.assert_close(gauss.double().square().sum(1), torch.full((len(blocks),), float(ff.L), dtype=torch.float64))
    P = _explicit_fastfood(ff)
    theta = torch.randn(d)
    torch.testing.assert_close(ff.delta(theta, 0, D).double(), P @ theta.double(), rtol=1e-5, atol=1e-6)
    g = torch.randn(D)
    grad = torch.zeros(d)
    ff.transpose_add(grad, g, 0)
    torch.testing.assert_close(grad.double(), P.T @ g.double(), rtol=1e-5, atol=1e-6)


def test_fastfood_is_an_isometry_in_expectation_only():
    P = Fastfood(seed=0, D=512, d=16).dense()  # L = 16 divides D: every column has norm exactly 1
    gram = P.T @ P
    torch.testing.assert_close(torch.diagonal(gram), torch.ones(16, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() > 1e-3  # not an exact isometry, unlike the partition
    assert off.abs().mean() < 0.1  # but near one: random, small cross terms
    # the partition is exact
    Pp = Partition(0, 512, 16).dense()
    torch.testing.assert_close(Pp.T @ Pp, torch.eye(16, dtype=torch.float64))


def test_fastfood_is_stateless_and_seeded():
    a, b = Fastfood(5, 300, 20).dense(), Fastfood(5, 300, 20).dense()
    assert torch.equal(a, b)
    assert not torch.allclose(a, Fastfood(6, 300, 20).dense())
    # neighbouring blocks are not copies of each other
    assert not torch.allclose(a[:32], a[32:64])


def test_gained_partition_has_the_asked_gains_and_the_partition_groups():
    gp = GainedPartition(seed=2, D=600, d=40, gain_ratio=16.0)
    gains = gp.gains(dtype=torch.float64)
    assert math.isclose(float(gains.max() / gains.min()), 16.0, rel_tol=1e-9)
    assert math.isclose(float(gains.square().mean()), 1.0, rel_tol=1e-9)
    assert not torch.equal(gains, gains.sort().values)  # dealt by a seeded shuffle, not in order
    plain = Partition(2, 600, 40)
    assert torch.equal(gp.ids(0, 600), plain.ids(0, 600))
    P = gp.dense()
    torch.testing.assert_close(P.T @ P, torch.diag(gains.square()))
    assert torch.equal(make_projection("partition", 2, 600, 40, 2, 1.0).dense(), plain.dense())


PROJECTION_CASES = [c for c in CASES if c[0] in ("mlp-bias", "embedding", "conv", "llama-all-linear")]
VARIANTS = {"fastfood": dict(projection="fastfood"), "gains-16": dict(column_gain_ratio=16.0)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,make,kwargs,inputs", PROJECTION_CASES, ids=[c[0] for c in PROJECTION_CASES])
def test_update_and_gradient_equal_dense_reference(name, make, kwargs, inputs, variant):
    base = make()
    ref_base = copy.deepcopy(base)
    for p in ref_base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, gpart.GPartConfig(d=60, seed=5, init_scale=0.3, **kwargs, **VARIANTS[variant]))
    x = inputs()
    theta_ref, run_ref = _dense_reference(ref_base, model)
    out, ref = _logits(model(*x)), _logits(run_ref(*x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(model.base_model.gpart_theta["default"].grad, theta_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_projection_is_saved_and_loaded_with_the_adapter(tmp_path, variant):
    torch.manual_seed(0)
    base = MLP()
    pristine = copy.deepcopy(base)
    start = copy.deepcopy(base)
    model = get_peft_model(base, gpart.GPartConfig(d=40, seed=4, init_scale=0.5, target_modules=["lin0", "lin1"],
                                                   **VARIANTS[variant]))
    x = torch.randn(3, 10)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(start, tmp_path)
    cfg = loaded.peft_config["default"]
    assert (cfg.projection, cfg.column_gain_ratio) == (model.peft_config["default"].projection,
                                                       model.peft_config["default"].column_gain_ratio)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    # and it is not the default partition's update
    plain = get_peft_model(pristine, gpart.GPartConfig(d=40, seed=4, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        plain.base_model.gpart_theta["default"].copy_(loaded.base_model.gpart_theta["default"])
        assert not torch.allclose(plain(x), y)


def test_no_per_weight_tensor_is_saved_for_backward_with_fastfood():
    model = get_peft_model(MLP(), gpart.GPartConfig(d=30, target_modules=["lin0"], projection="fastfood",
                                                   init_scale=0.1))
    layer = model.base_model.model.lin0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(3, 10))
    weight = layer.base_layer.weight  # W0 itself is kept by reference, as in any linear layer
    extra = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    assert extra == [], [tuple(t.shape) for t in extra]
    y.sum().backward()
    assert model.base_model.gpart_theta["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(projection="hadamard"), "projection='hadamard' is not supported; choose one of partition, fastfood"),
    (dict(column_gain_ratio=0.5), "column_gain_ratio must be a number >= 1"),
    (dict(projection="fastfood", column_gain_ratio=4.0), "applies to projection='partition' only"),
])
def test_bad_projection_choices_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpart.GPartConfig(d=4, **kwargs)


def test_fastfood_too_large_is_refused_with_the_limit():
    d = (1 << MAX_LOG2_L) + 1
    with pytest.raises(PartitionError, match=r"needs a Walsh-Hadamard transform of size 2\^25.*Use a smaller d"):
        Fastfood(0, 1 << 26, d)
    with pytest.raises(PartitionError, match="unknown projection 'x'"):
        make_projection("x", 0, 10, 2, 2)
