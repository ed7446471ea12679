"""GPart on a CUDA GPU: the compiled Triton kernels and a whole training step against the CPU reference.

Skipped without a CUDA device (CI has none); benchmarks/gpu_check.sh runs them on a lent GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

import gpart.kernels as K  # noqa: E402
from gpart import GPartConfig, VERSIONS  # noqa: E402
from gpart.functional import DropConnect, TensorSlice, delta, transpose_add  # noqa: E402
from gpart.partition import Partition  # noqa: E402

# (seed, D, d, start, length): narrow and wide paths, cycle-walking heavy, d = 1, d = D
CASES = [
    (1, 1000, 10, 0, 1000),
    (5, 4097, 4096, 0, 4097),
    (9, 85_000_000, 131072, 12_345_678, 300_001),
    (6, (1 << 20) + 1, 1, 0, 5000),
    (7, (1 << 20) + 1, (1 << 20) + 1, (1 << 20) - 3000, 3001),
    (13, (1 << 33) + 5, 524_288, (1 << 33) - 30_000, 30_005),
]
DROPS = [None, DropConnect(0.3, (1 << 40) + 17)]


def _reference(fn):
    with K.use_backend("reference"):
        return fn()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"D{c[1]}-d{c[2]}")
def test_compiled_triton_ids_gather_scatter_equal_the_reference(case, version):
    seed, D, d, start, n = case
    part = Partition(seed, D, d, version)
    assert K.backend_for(torch.device("cuda")) == "triton"
    assert torch.equal(K.ids(part, start, n, device="cuda").cpu(), part.ids(start, n))
    theta_s = torch.randn(d)
    grad = torch.randn(n)
    for drop in DROPS:
        ref = _reference(lambda: delta(theta_s, TensorSlice(part, start, (n,)), drop))
        assert torch.equal(delta(theta_s.cuda(), TensorSlice(part, start, (n,)), drop).cpu(), ref)
        acc_ref = torch.zeros(d)
        _reference(lambda: transpose_add(acc_ref, grad, TensorSlice(part, start, (n,)), drop))
        acc = torch.zeros(d, device="cuda")
        transpose_add(acc, grad.cuda(), TensorSlice(part, start, (n,)), drop)
        torch.testing.assert_close(acc.cpu(), acc_ref, rtol=1e-5, atol=1e-5)  # fp32 atomics: any order


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True))


def _step(model, ids):
    torch.manual_seed(0)  # DropConnect keys come from the CPU generator on every device: the same masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float().cpu(), model.base_model.gpart_theta["default"].grad.float().cpu()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_training_step_on_cuda_matches_cpu(dropout):
    """fp32 on the GPU (Triton kernels) against the CPU (C++ kernels): the same loss and dL/dtheta."""
    from peft import get_peft_model

    base = _tiny_llama()
    config = GPartConfig(d=500, seed=3, init_scale=0.02, target_modules="all-linear", dropout=dropout)
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    cpu = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    gpu = get_peft_model(copy.deepcopy(base), copy.deepcopy(config)).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    loss_c, grad_c = _step(cpu, ids)
    loss_g, grad_g = _step(gpu, ids.cuda())
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_g, grad_c, rtol=1e-3, atol=1e-5)


def test_bf16_weights_on_cuda_update_within_bf16_tolerance_of_delta_w():
    """bf16 base weights on the GPU: the merged weight equals bf16(W0 + P theta) computed in fp32."""
    from peft import get_peft_model

    base = _tiny_llama().to(torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), GPartConfig(d=700, seed=2, init_scale=0.05,
                                                            target_modules=["q_proj", "down_proj"])).cuda()
    merged = copy.deepcopy(model).merge_and_unload()
    config = model.peft_config["default"]
    theta = model.base_model.gpart_theta["default"].detach().float().cpu()
    delta = Partition(config.seed, config.D, config.d, config.partition_version).dense().float() @ theta
    offset = 0
    for name, shape in config.layout:
        n = shape[0] * shape[1]
        w0 = base.get_parameter(name).float()
        expected = (w0 + delta[offset:offset + n].view(shape)).to(torch.bfloat16).float()
        got = merged.get_parameter(name).float().cpu()
        # bf16 rounding of W0 + Delta_W: at most half an ulp of the result, which is the tolerance of Delta_W
        torch.testing.assert_close(got, expected, rtol=2 ** -8, atol=1e-6)
        offset += n
