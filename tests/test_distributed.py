"""Real multi-process runs (2 CPU processes, gloo): theta after N steps equals the single-process run."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from conftest import tiny_llama
    from peft import get_peft_model

    import gpart

    return get_peft_model(tiny_llama(seed=0), gpart.GPartConfig(d=256, seed=1, target_modules="all-linear"))


def _batch():
    return torch.randint(0, 120, (4, 8), generator=torch.Generator().manual_seed(0))


def _train(model, x, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()


def _worker(rank, world, mode, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _model()
        x = _batch()[rank * 2 : (rank + 1) * 2]  # each rank half of the global batch
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            _train(DistributedDataParallel(model), x)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.base_model.model.model.layers:
                fully_shard(block)
            fully_shard(model)
            _train(model, x)
            assert type(model.base_model.gpart_theta["default"].data).__name__ == "DTensor"
        model.save_pretrained(os.path.join(out_dir, mode), is_main_process=rank == 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_and_save_whole_theta(mode, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ref = _model()
    _train(ref, _batch())
    expected = ref.base_model.gpart_theta["default"].detach()
    mp.spawn(_worker, args=(2, mode, _free_port(), str(tmp_path)), nprocs=2)
    saved = load_file(tmp_path / mode / "adapter_model.safetensors")["base_model.gpart_theta"]
    assert saved.shape == (256,)
    torch.testing.assert_close(saved, expected, rtol=1e-5, atol=1e-7)
