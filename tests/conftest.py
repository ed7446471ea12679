"""Tiny models built from configs (offline) and small helpers shared by the tests.

Under CI=true the run is reproducible and complete: Hypothesis draws the same examples every time,
and a machine that cannot run gpart's C++ or Triton kernels fails at the start instead of skipping
their tests.
"""

from __future__ import annotations

import csv
import json
import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

IN_CI = os.environ.get("CI", "").lower() == "true"
settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    settings.load_profile("ci")


def pytest_sessionstart(session):
    if IN_CI:
        require_kernels()


def require_kernels() -> None:
    """The kernel tests skip where the C++ kernels cannot be built or Triton is missing; CI must run them."""
    import gpart.kernels

    try:
        gpart.kernels.build(verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure is reported as is
        raise pytest.UsageError(f"CI=true but gpart's C++ kernels cannot be built here ({e}); install a C++ "
                                "compiler (g++ or clang++), or unset CI to let their tests skip") from e
    if importlib.util.find_spec("triton") is None:
        raise pytest.UsageError("CI=true but Triton is not installed (its kernels' tests would skip); install "
                                "the gpu extra (scripts/bootstrap.sh does), or unset CI to let them skip")


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


# -- the command line's tiny text task ------------------------------------------------------------------

POS, NEG = ["good", "great", "fine", "love", "nice"], ["bad", "awful", "poor", "hate", "terrible"]
FILLER = ["the", "a", "movie", "film", "food", "was", "is", "very"]


def word_tokenizer(words, specials, **kw):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw), len(vocab)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def reviews(n: int, seed: int) -> list[dict]:
    """n short reviews, alternately negative and positive; the label is decided by the last word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(3)] + [rng.choice(POS if label else NEG)]
        rows.append({"text": " ".join(words), "label": ["neg", "pos"][label]})
    return rows


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with a word-level tokenizer, and a train/test CSV folder."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("text")
    tokenizer, vocab = word_tokenizer(POS + NEG + FILLER, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                      pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    (root / "data").mkdir()
    write_csv(root / "data" / "train.csv", reviews(64, 0))
    write_csv(root / "data" / "test.csv", reviews(20, 1))
    return root


def run_cli(argv, capsys):
    """gpart.cli.main for commands expected to fail: returns (exit code, stderr)."""
    from gpart.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capsys.readouterr().err


# -- a word-level chat tokenizer (ChatML template) ------------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant tool you help what is plus ? hi hello bye ok Question Answer : ####".split()
         + [str(i) for i in range(20)])


def make_tokenizer(template: str | None = CHATML):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    eos = "<|im_end|>" if template else "</s>"
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token=eos,
                                  bos_token="<s>")
    if template:
        out.chat_template = template
    return out


def write_tiny_chat_lm(root: Path, conversations: int = 40) -> Path:
    """A 2-layer Llama (linear layers wide enough for bitsandbytes' 64-weight blocks), its ChatML word
    tokenizer, and chat.jsonl: `conversations` of them (`gpart train` holds out a tenth for testing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(CHATML)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    with (root / "chat.jsonl").open("w") as f:
        for i in range(conversations):
            a, b = i % 5, (3 * i) % 7
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} plus {b} ?"},
                                             {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return root


# -- arithmetic chats for TRL (a word-level ChatML tokenizer that fits BNB_LLAMA's vocabulary) -----------

QA_WORDS = ("what is one two three four five six plus minus times and the answer question user assistant system "
            "please add numbers").split()
QA = [("one plus one", "two"), ("two plus two", "four"), ("three plus three", "six"), ("six minus two", "four"),
      ("five minus four", "one"), ("two times three", "six"), ("one plus four", "five"), ("four minus one", "three")]


def chatml_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + QA_WORDS)}
    assert len(vocab) <= BNB_LLAMA["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", additional_special_tokens=specials[2:])
    fast.chat_template = CHATML
    return fast


def qa_conversations():
    import datasets

    return datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": f"what is {q}"}, {"role": "assistant", "content": a}]} for q, a in QA
    ])


# -- scripts of benchmarks/ and studies/ ----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "studies"))  # the repo's one script loader (benchmarks/ must stay off the path)
from study_scripts import load_script  # noqa: E402,F401  (tests load benchmark and study scripts with it)


@pytest.fixture
def llm_study_domains(monkeypatch):
    """The LLM study's domains in the quality study's table for one test (the study's script registers them
    when it runs, not on import, so the table stays as it is for every other test)."""
    quality = load_script("benchmarks/quality.py")
    for name, spec in load_script("studies/llm_methods/llm_methods.py").domain_specs().items():
        monkeypatch.setitem(quality.DOMAINS, name, spec)
