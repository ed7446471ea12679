"""TRL's SFTTrainer with a GPartConfig: conversational and prompt/completion data, float and 4-bit bases.

Offline: a tiny Llama from a config and a word-level tokenizer with a ChatML template built here."""

from __future__ import annotations

import pytest
import torch
from conftest import QA, bnb_llama, chatml_word_tokenizer, load_quantized, qa_conversations
from peft import PeftModel

from gpart import GPartConfig

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.filterwarnings("ignore")

def prompt_completion():
    return datasets.Dataset.from_list([{"prompt": f"what is {q} answer", "completion": f" {a}"} for q, a in QA])


def _base(quantized, bnb_llama_dir):
    if quantized:
        pytest.importorskip("bitsandbytes")
        return load_quantized(bnb_llama_dir, "nf4")
    return bnb_llama()


def _train(tmp_path, model, data, **config):
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=2e-2, logging_steps=1, report_to="none", save_strategy="no", max_length=32,
                         dataloader_num_workers=0, seed=0, **config)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=chatml_word_tokenizer(),
                             peft_config=GPartConfig(d=512, seed=0, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]))
    theta = trainer.model.base_model.gpart_theta["default"]
    assert theta.dtype == torch.float32  # also after TRL's bf16 cast of a quantized model's trainables
    before = theta.detach().clone()
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(map(lambda v: torch.isfinite(torch.tensor(v)), losses))
    assert result.training_loss > 0 and not torch.equal(theta.detach(), before)
    return trainer, theta


def _check_reload(trainer, tmp_path, quantized, bnb_llama_dir):
    # without the bf16 autocast wrapper Accelerate put around forward for mixed-precision training
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    model.save_pretrained(tmp_path / "adapter")
    x = torch.tensor([chatml_word_tokenizer()("what is two plus two")["input_ids"]])
    loaded = PeftModel.from_pretrained(_base(quantized, bnb_llama_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits.float()
        assert torch.equal(loaded(input_ids=x).logits.float(), expected)
        base = _base(quantized, bnb_llama_dir)
        reference = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        with reference.disable_adapter():
            assert not torch.allclose(reference(input_ids=x).logits.float(), expected)  # the adapter changes it


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_sft_on_conversational_data(quantized, bnb_llama_dir, tmp_path):
    # use_cpu=True: TRL's default bf16 runs as CPU autocast
    trainer, theta = _train(tmp_path, _base(quantized, bnb_llama_dir), qa_conversations(), use_cpu=True)
    _check_reload(trainer, tmp_path, quantized, bnb_llama_dir)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_sft_on_prompt_completion_data(quantized, bnb_llama_dir, tmp_path):
    trainer, theta = _train(tmp_path, _base(quantized, bnb_llama_dir), prompt_completion(), bf16=False)
    # the loss is on the completion only: the prompt's tokens carry no label in what the trainer collates
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(chatml_word_tokenizer()(example["prompt"])["input_ids"])
    assert 0 < n_prompt < len(ids)
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    _check_reload(trainer, tmp_path, quantized, bnb_llama_dir)


def test_theta_and_adam_state_stay_float32_through_trls_bf16_cast_of_a_quantized_model(bnb_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = load_quantized(bnb_llama_dir, "nf4-dq")
    assert model.is_loaded_in_4bit  # what makes TRL cast every trainable parameter to bf16
    trainer, theta = _train(tmp_path, model, qa_conversations(), use_cpu=True)
    assert theta.dtype == torch.float32
    state = trainer.optimizer.state[theta]
    assert {k: v.dtype for k, v in state.items() if k != "step"} == {"exp_avg": torch.float32,
                                                                     "exp_avg_sq": torch.float32}
    # updates far below bf16's spacing at theta's magnitude were kept (a bf16 theta would have lost them)
    assert not torch.equal(theta.detach(), theta.detach().to(torch.bfloat16).float())
