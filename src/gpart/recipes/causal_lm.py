"""Supervised fine-tuning of a causal LM: question/answer tables, prompt/completion or chat data.

How rows become text and labels (chat templates, the loss on assistant/completion tokens only) is in
lm_format. Evaluation generates greedily from the same prompt (the template's generation prompt for
chat data) and scores exact match against the row's reference answer.
"""
from __future__ import annotations

import warnings

import torch

from . import data as D
from . import lm_format as F
from . import models
from .base import TaskData, TaskRecipe
from .metrics import exact_match, extract_final_number, reference_match


class CausalLM(TaskRecipe):
    name = "causal-lm"
    task_type = "CAUSAL_LM"
    target_family = "attention-qkvo"
    primary_metric = "loss"  # generation is too slow to run at every evaluation; exact match at the end
    greater_is_better = False
    has_head = False
    loss_is_batch_mean = False  # summed over tokens / num_items_in_batch: one mean over every process's tokens
    # Reference MetaMathQA settings: cosine, 5% warm-up, weight decay 0.01, dropout 0.05; 1 epoch for CPU
    # runs. d, targets and the learning rates are the quality study's best on SmolLM2 (docs/results.md,
    # LLM domain): q,k,v,o beat every linear layer at the same d, d = 131,072 (the reference's choice
    # for Qwen2.5-0.5B) beat 262,144 at the same lr, and theta lr 3e-2 was the best of 1e-2,
    # 3e-2, 9e-2 (LoRA: 6e-3 of 2e-3, 6e-3, 1.8e-2) at 16 steps of 8: under the learning-rate rule
    # (gpart.lr: theta lr = base * (10,000/d)^0.75) that is the base value 2e-1 (2.9e-2 at d = 131,072). The reference's 2e-4 (LoRA 2e-4)
    # was meant for long 7B runs; sweep --lr on the validation split for long runs.
    defaults = dict(model="smollm2", dataset="gsm-symbolic", d=131072, lr=2e-1, head_lr=0.0, epochs=1,
                    batch_size=4, weight_decay=0.01, warmup=0.05, dropout=0.05, scheduler="cosine",
                    max_length=512, lora_lr=6e-3)

    def load_data(self, args, *, saved=None) -> TaskData:
        dataset = D.load(args, "causal-lm", question_column=args.prompt_column, answer_column=args.answer_column,
                         solution_column=args.response_column, data_format=getattr(args, "data_format", None))
        splits = D.finish_splits(dataset.splits, seed=args.seed, val_fraction=args.val_fraction,
                                 test_fraction=getattr(args, "test_fraction", 0.0))
        fmt = getattr(dataset, "format", "question-answer")  # MathDataset rows are question/answer
        return TaskData(D.limit_splits(splits, args), None, args.dataset, format=fmt)

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, path, args, labels):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **models.load_options(args))
        return model, _tokenizer(path, model)

    def load_saved_model(self, path, args, labels):
        return self.load_model(path, args, labels)

    def make_dataset(self, records, tokenizer, args, data, *, train):
        split = "train" if train else "validation"
        out = []
        for i, row in enumerate(records):
            example = F.training_example(tokenizer, row, data.format, args.max_length, F.row_name(row, split, i))
            if example is not None:
                out.append(example)
        _report_skips(data, split, len(records) - len(out), len(records), args.max_length,
                      "their prompt alone fills it, so no answer token is left to learn from")
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
        qa = data.format == "question-answer"
        prompts, references, kept, bases = [], [], [], set()
        for i, row in enumerate(records):
            ids, reference, basis = F.generation_prompt(tokenizer, row, data.format, F.row_name(row, "test", i))
            if len(ids) > args.max_length:
                if not qa:  # a cut chat prompt loses its start (system prompt, template header): skip it
                    continue
                ids = ids[len(ids) - args.max_length:]  # question/answer: keep the end, next to "Answer:"
            prompts.append(ids)
            references.append(reference)
            kept.append(row)
            bases.add(basis)
        skipped = len(records) - len(kept)
        if records and not kept:
            raise D.DataError(f"all {len(records)} evaluation prompts are longer than --max-length "
                              f"{args.max_length}; raise --max-length")
        if skipped:
            warnings.warn(f"{skipped} of {len(records)} evaluation prompts are longer than --max-length "
                          f"{args.max_length} and were skipped", stacklevel=2)
        stop_ids, stop_texts = F.end_of_turn(tokenizer) if not qa else (F.eos_ids(tokenizer), [F.QA_STOP])
        outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                           batch_size=args.eval_batch_size, stop_ids=stop_ids, stop_texts=stop_texts)
        if qa:
            result = exact_match(outputs, references)
            result["answered"] = sum(extract_final_number(o) is not None for o in outputs) / max(1, len(outputs))
        else:
            result = reference_match(outputs, references)
            result["reference"] = bases.pop() if len(bases) == 1 else "answer where given, else " + \
                ("the completion" if "completion" in bases else "the last assistant message")
        result["n"] = len(kept)
        if skipped:
            result["skipped_too_long"] = skipped
        result["examples"] = [{"prompt": _prompt_text(r)[:200], "output": o[-300:], "answer": ref}
                              for r, o, ref in list(zip(kept, outputs, references))[:3]]
        return result

    def task_info(self, args, data):
        return {"max_length": args.max_length, "prompt_column": args.prompt_column,
                "response_column": args.response_column, "answer_column": args.answer_column,
                "data_format": getattr(args, "data_format", None), "format": data.format}


def _prompt_text(row: dict) -> str:
    if "question" in row:
        return row["question"]
    if "messages" in row:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        return users[-1] if users else row["messages"][0]["content"]
    return row["prompt"]


def _report_skips(data: TaskData, split: str, skipped: int, total: int, max_length: int, why: str) -> None:
    """Rows left out for length are counted in the run's metrics and warned about; all of them is an error."""
    if not skipped:
        return
    if skipped == total:
        raise D.DataError(f"all {total} {split} examples are longer than --max-length {max_length}: {why}; "
                          "raise --max-length")
    data.skipped[split] = skipped
    warnings.warn(f"{skipped} of {total} {split} examples skipped: longer than --max-length {max_length} ({why})",
                  stacklevel=3)


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
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             stop_ids: list[int], stop_texts: list[str]) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, each cut at its first
    stop token (EOS, the template's end of turn) or stop text."""
    from transformers.utils.logging import tqdm  # off under `gpart train --quiet`

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, less padding
    texts = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=stop_ids or None,
                             stopping_criteria=[_StopAfter(tokenizer, width, stop_texts)] if stop_texts else None)
        for i, seq in zip(idx, out[:, width:].tolist()):
            cut = next((k for k, t in enumerate(seq) if t in stop_ids), len(seq))
            text = tokenizer.decode(seq[:cut], skip_special_tokens=True)
            for stop in stop_texts:
                text = text.split(stop)[0]
            texts[i] = text.strip()
    return texts


class _StopAfter:
    """Stop a row once its continuation contains a stop text. (transformers' stop_strings needs a tokenizer
    whose vocabulary it can map to strings; decoding the last few tokens works with any.)"""

    def __init__(self, tokenizer, prompt_len: int, stops: list[str], window: int = 8):
        self.tokenizer, self.prompt_len, self.stops, self.window = tokenizer, prompt_len, stops, window

    def __call__(self, input_ids, scores, **kwargs):
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


RECIPE = CausalLM()
