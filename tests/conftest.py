"""Tiny models built from configs (offline) and small helpers shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16, bias=bias)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.relu(self.lin1(self.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2d = nn.Conv2d(4, 5, (2, 2), stride=(1, 2))
        self.conv3d = nn.Conv3d(1, 2, 2)
        self.head = nn.Linear(5 * 1 * 2 + 2 * 1 * 3 * 3, 2)

    def forward(self, x):  # x: (B, 3, 8)
        a = torch.relu(self.conv1d(x))  # (B, 4, 8)
        b = self.conv2d(a.view(-1, 4, 2, 4))  # (B, 5, 1, 2)
        c = self.conv3d(a.reshape(-1, 1, 2, 4, 4))  # (B, 2, 1, 3, 3)
        return self.head(torch.cat([b.flatten(1), c.flatten(1)], 1))


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.lin = nn.Linear(8, 3)

    def forward(self, ids):
        return self.lin(self.emb(ids).mean(1))


def tiny_bert(num_labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed=0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, max_position_embeddings=70)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48, num_labels=4)
    return ViTForImageClassification(cfg).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# -- quantized (bitsandbytes) bases ---------------------------------------------------------------------

# bitsandbytes' 4-bit CPU kernels want in_features >= 64 and out_features a multiple of 32
BNB_LLAMA = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
QUANT_MODES = ["nf4", "fp4", "nf4-dq", "fp4-dq", "8bit"]


def bnb_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**BNB_LLAMA)).eval()


def bnb_config(mode: str):
    """BitsAndBytesConfig for a mode of QUANT_MODES ("-dq": double quantization)."""
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode[:3], bnb_4bit_use_double_quant=mode.endswith("-dq"),
                              bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="session")
def bnb_llama_dir(tmp_path_factory):
    """A saved float tiny Llama (seed 0) that tests load quantized with from_pretrained."""
    path = tmp_path_factory.mktemp("bnb-llama")
    bnb_llama().save_pretrained(path)
    return path


def load_quantized(path, mode: str, device="cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(mode), device_map=device,
                                                dtype=torch.float32).eval()
