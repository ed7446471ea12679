"""How causal-LM rows become tokens: chat templates, completion-only labels, generation prompts.

Rows come from gpart.assets (ChatDataset or MathDataset rows). Three ways to write a row as text:

- question/answer: "Question: {q}\nAnswer: {solution}<eos>" (the reference MetaMathQA format), always,
  whether or not the model has a chat template. Base models ship chat templates too (Qwen2.5's do), so
  having one does not mean the model was trained to chat; keeping this format also keeps earlier runs
  and their adapters comparable. Data meant for the template is written as prompt/completion or messages.
- prompt/completion text: with a chat template, a user turn and an assistant turn; without one,
  prompt + completion + eos (TRL's plain prompt-completion).
- messages: the chat template (required).

Labels: the loss covers assistant/completion tokens only. Templates rarely mark assistant spans
({% generation %}), so the spans are found by rendering growing prefixes of the conversation
(open-instruct's method): assistant turn i covers the tokens from the end of
render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]): its content
and the end-of-turn text the template writes after it (ChatML: "<|im_end|>\n"), not the role header.
This is only right when each prefix renders as the start of the whole conversation and its tokens
are the start of the whole's tokens; both are checked, and a template or tokenizer that breaks it is
an error naming the row.
"""
from __future__ import annotations

from .data import DataError

QA_PROMPT = "Question: {question}\nAnswer:"
QA_STOP = "\nQuestion:"  # the model starting a new question means its answer is over
IGNORE = -100
_SENTINEL = "\x00gpart-end-of-turn-probe\x00"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text rendered by a chat template (it writes its own BOS, as apply_chat_template assumes)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict], *, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja errors of all kinds: the template rejects this row
        raise DataError(f"{where}: the model's chat template cannot render this conversation "
                        f"({type(e).__name__}: {e})") from None


def row_name(row: dict, split: str, index: int) -> str:
    """How errors name a row: its file and line when the reader recorded them, else split and index."""
    return row.get("where") or f"{split} example {index}"


def as_messages(row: dict) -> tuple[list[dict], int] | None:
    """(messages, train_from) for a chat-template row; None for a plain-text prompt/completion row."""
    if "messages" in row:
        return row["messages"], row.get("train_from", 0)
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}], 0


def conversation_example(tokenizer, messages: list[dict], train_from: int, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation, labels on assistant turns at index >= train_from."""
    whole = render(tokenizer, messages, generation_prompt=False, where=where)
    ids = encode(tokenizer, whole)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        head = render(tokenizer, messages[:i], generation_prompt=True, where=where)
        upto = render(tokenizer, messages[:i + 1], generation_prompt=False, where=where)
        if not (upto.startswith(head) and whole.startswith(upto)):
            raise DataError(
                f"{where}: the model's chat template is not prefix-preserving: the conversation up to assistant "
                f"message {i} does not render as the start of the whole conversation, so its tokens cannot be "
                "found (gpart labels each assistant turn by rendering growing prefixes). Use a model whose "
                "template renders earlier turns the same way, or train on the last turn only "
                "(prompt/completion data)")
        start, end = encode(tokenizer, head), encode(tokenizer, upto)
        if end[:len(start)] != start or ids[:len(end)] != end:
            raise DataError(f"{where}: assistant message {i}: the tokenizer merges text across the turn boundary, "
                            "so the turn's tokens differ inside the conversation and alone")
        labels[len(start):len(end)] = ids[len(start):len(end)]
    return ids, labels


def training_example(tokenizer, row: dict, fmt: str, max_length: int, where: str) -> dict | None:
    """{"input_ids", "labels"} for one row, cut to max_length; None when no labelled token is left
    (the prompt alone fills max_length: the caller counts and reports the skip)."""
    if fmt == "question-answer":
        prompt = tokenizer(QA_PROMPT.format(question=row["question"]))["input_ids"]
        answer = tokenizer(" " + row["solution"], add_special_tokens=False)["input_ids"] + eos_ids(tokenizer)
        answer = answer[:max_length]  # an overlong answer is cut at the end ...
        prompt = prompt[max(0, len(prompt) - (max_length - len(answer))):]  # ... and the prompt from the left
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}
    if has_chat_template(tokenizer):
        messages, train_from = as_messages(row)
        ids, labels = conversation_example(tokenizer, messages, train_from, where)
    elif "messages" in row:
        raise DataError(no_template_message(tokenizer))
    else:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos_ids(tokenizer)
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    ids, labels = ids[:max_length], labels[:max_length]  # keep the start, as TRL does
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def no_template_message(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    return (f"conversational data (messages) needs a chat template, and the tokenizer of {name} has none; "
            "use a model with a chat template, or write the data as prompt/completion text")


def generation_prompt(tokenizer, row: dict, fmt: str, where: str) -> tuple[list[int], str, str]:
    """(prompt ids, reference answer, what the reference is) for greedy generation on one row.

    Conversations are cut before their last assistant message; the reference is the row's "answer"
    when it has one, else that message's content (or the completion)."""
    if fmt == "question-answer":
        return tokenizer(QA_PROMPT.format(question=row["question"]))["input_ids"], row["answer"], "answer"
    if has_chat_template(tokenizer):
        messages, _ = as_messages(row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = encode(tokenizer, render(tokenizer, messages[:last], generation_prompt=True, where=where))
        fallback, basis = messages[last]["content"], ("completion" if "prompt" in row else "last assistant message")
    elif "messages" in row:
        raise DataError(no_template_message(tokenizer))
    else:
        ids, fallback, basis = tokenizer(row["prompt"])["input_ids"], row["completion"], "completion"
    if row.get("answer") is not None:
        return ids, row["answer"], "answer"
    return ids, fallback, basis


def end_of_turn(tokenizer) -> tuple[list[int], list[str]]:
    """(token ids, texts) that end an assistant turn: EOS, and the text a chat template writes after
    an assistant message (ChatML's "<|im_end|>"): one token is a stop id, longer text a stop string."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not has_chat_template(tokenizer):
        return ids, []
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than this probe; EOS alone stops
        return ids, []
    tail = text.split(_SENTINEL, 1)[-1].strip() if _SENTINEL in text else ""
    if not tail:
        return ids, []
    tail_ids = encode(tokenizer, tail)
    if len(tail_ids) == 1:
        return list(dict.fromkeys(ids + tail_ids)), [tail]
    first = encode(tokenizer, tail)[:1]  # e.g. "<|eot_id|>" then more text: the special token alone
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if first and first[0] in special:
        return list(dict.fromkeys(ids + first)), [tail]
    return ids, [tail]


def eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
