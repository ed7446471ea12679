"""Supervised fine-tuning of a causal LM on question -> worked solution, scored by exact match.

Format as in the reference MetaMathQA script: "Question: {q}\nAnswer: {solution}<eos>", loss on
the answer only, prompts truncated from the left. Evaluation generates greedily from
"Question: {q}\nAnswer:" and compares the final number with the reference answer.
"""
from __future__ import annotations

import torch

from . import data as D
from .base import TaskData, TaskRecipe
from .metrics import exact_match, extract_final_number

PROMPT = "Question: {question}\nAnswer:"
STOP = "\nQuestion:"  # the model starting a new question means its answer is over


class CausalLM(TaskRecipe):
    name = "causal-lm"
    task_type = "CAUSAL_LM"
    target_family = "attention-qkvo"
    primary_metric = "loss"  # generation is too slow to run at every evaluation; exact match at the end
    greater_is_better = False
    has_head = False
    loss_is_batch_mean = False  # summed over tokens / num_items_in_batch: one mean over every process's tokens
    # Reference MetaMathQA settings: q,k,v,o, theta lr 2e-4, cosine, 5% warm-up, weight decay 0.01,
    # dropout 0.05. d = 131,072 is the reference's choice for Qwen2.5-0.5B; 1 epoch for CPU runs.
    defaults = dict(model="smollm2", dataset="gsm-symbolic", d=131072, lr=1.8e-2, head_lr=0.0, epochs=1,
                    batch_size=4, weight_decay=0.01, warmup=0.05, dropout=0.05, scheduler="cosine",
                    max_length=512, lora_lr=2e-4)

    def load_data(self, args, *, saved=None) -> TaskData:
        dataset = D.load(args, "math", question_column=args.prompt_column, answer_column=args.answer_column,
                         solution_column=args.response_column)
        splits = D.finish_splits(dataset.splits, seed=args.seed, val_fraction=args.val_fraction)
        return TaskData(D.limit_splits(splits, args), None, args.dataset)

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, path, args, labels):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return model, _tokenizer(path, model)

    def load_saved_model(self, path, args, labels):
        return self.load_model(path, args, labels)

    def make_dataset(self, records, tokenizer, args, data, *, train):
        prompts = tokenizer([PROMPT.format(question=r["question"]) for r in records])["input_ids"]
        answers = tokenizer([" " + r["solution"] for r in records], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out = []
        for p, a in zip(prompts, answers):
            a = (a + eos)[: args.max_length]  # an overlong answer is cut at the end ...
            p = p[max(0, len(p) - (args.max_length - len(a))):]  # ... and the prompt from the left
            out.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
        return out

    def compute_metrics(self, data):
        return token_mean_loss

    def preprocess_logits(self):
        return token_loss_stats

    def collator(self, tokenizer, args):
        pad = tokenizer.pad_token_id

        def collate(features):
            width = max(len(f["input_ids"]) for f in features)
            ids = torch.full((len(features), width), pad, dtype=torch.long)
            labels = torch.full((len(features), width), -100, dtype=torch.long)
            mask = torch.zeros((len(features), width), dtype=torch.long)
            for i, f in enumerate(features):  # right padding for training
                n = len(f["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        return collate

    @torch.no_grad()
    def evaluate(self, model, tokenizer, records, args, data):
        outputs = generate(model, tokenizer, [PROMPT.format(question=r["question"]) for r in records],
                           max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                           max_length=args.max_length)
        result = exact_match(outputs, [r["answer"] for r in records])
        result["answered"] = sum(extract_final_number(o) is not None for o in outputs) / max(1, len(outputs))
        result["n"] = len(records)
        result["examples"] = [{"question": r["question"][:200], "output": o[-300:], "answer": r["answer"]}
                              for r, o in list(zip(records, outputs))[:3]]
        return result

    def task_info(self, args, data):
        return {"max_length": args.max_length, "prompt_column": args.prompt_column,
                "response_column": args.response_column, "answer_column": args.answer_column}


def token_loss_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: [sum of the next-token losses on answer tokens, their number]. Kept instead of
    the logits, so the eval loss is one mean over every token of every process (the model's loss)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    labels = labels[:, 1:]  # the token each position predicts
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=-100, reduction="none").view(labels.shape)
    return torch.stack([losses.sum(1), (labels != -100).sum(1).float()], 1)


def token_mean_loss(eval_pred) -> dict:
    stats = eval_pred.predictions
    return {"loss": float(stats[:, 0].sum() / max(stats[:, 1].sum(), 1))}


def _tokenizer(path, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; pad with EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, max_length: int) -> list[str]:
    """Greedy continuations, batched with left padding, cut at the next "Question:"."""
    from tqdm.auto import tqdm

    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, less padding
    texts = [""] * len(prompts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 stopping_criteria=[_StopAfter(tokenizer, batch["input_ids"].shape[1])])
            for i, seq in zip(idx, out[:, batch["input_ids"].shape[1]:]):
                texts[i] = tokenizer.decode(seq, skip_special_tokens=True).split(STOP)[0].strip()
    finally:
        tokenizer.padding_side = side
    return texts


class _StopAfter:
    """Stop a row once its continuation contains STOP. (transformers' stop_strings needs a tokenizer
    whose vocabulary it can map to strings; decoding the last few tokens works with any.)"""

    def __init__(self, tokenizer, prompt_len: int, window: int = 8):
        self.tokenizer, self.prompt_len, self.window = tokenizer, prompt_len, window

    def __call__(self, input_ids, scores, **kwargs):
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([STOP in t for t in texts], dtype=torch.bool, device=input_ids.device)


RECIPE = CausalLM()
