"""Causal-LM data in any of the formats gpart reads: which one a table holds, and its rows checked.

Formats (TRL's names, see docs/cli.md): conversational "messages" (a list of {role, content}),
"prompt-completion" (strings, or lists of messages: TRL's conversational prompt/completion), and
gpart's "question-answer" tables (MathDataset). The format is detected from the columns; a table
whose columns fit several is an error that says how to choose.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .data_types import (CAUSAL_LM, CHAT, MATH, MESSAGES, PROMPT_COMPLETION, QUESTION_ANSWER, ROLES, ChatDataset,
                         MathDataset)
from .errors import DatasetError

# split -> (where it comes from, its column names, read(required columns) -> ("where", row) records)
Sources = dict[str, tuple[object, Sequence[str], Callable[[Sequence[str]], Iterable[tuple[str, dict]]]]]


def detect_format(where: object, columns: Sequence[str], *, question_column: str = "question",
                  answer_column: str = "answer", task: str = CAUSAL_LM, asked: str | None = None) -> str:
    """The format of a table with these columns: `asked` if given (checked), else the one that fits."""
    needs = {MESSAGES: ("messages",), PROMPT_COMPLETION: ("prompt", "completion"),
             QUESTION_ANSWER: (question_column, answer_column)}
    allowed = {MATH: (QUESTION_ANSWER,), CHAT: (MESSAGES, PROMPT_COMPLETION)}.get(task, tuple(needs))
    if asked not in (None, "auto"):
        if asked not in allowed:
            raise DatasetError(f"{where}: data format {asked!r} is not one of {', '.join(allowed)}")
        missing = [c for c in needs[asked] if c not in columns]
        if missing:
            raise DatasetError(f"{where}: format {asked!r} needs the columns {', '.join(needs[asked])}; "
                               f"missing {', '.join(missing)} (columns found: {', '.join(map(str, columns)) or 'none'})")
        return asked
    fits = [f for f in allowed if all(c in columns for c in needs[f])]
    if len(fits) == 1:
        return fits[0]
    described = "; ".join(f"{f}: {', '.join(needs[f])}" for f in allowed)
    if not fits:
        raise DatasetError(f"{where}: no known causal-LM format in the columns {', '.join(map(str, columns)) or 'none'}; "
                           f"expected the columns of one of ({described}). Rename the columns, or name the "
                           "question/answer ones with --prompt-column / --answer-column")
    raise DatasetError(f"{where}: the columns {', '.join(map(str, columns))} fit several formats ({', '.join(fits)}); "
                       f"choose one with --data-format {'|'.join(fits)}")


def lm_dataset(sources: Sources, *, task: str = CAUSAL_LM, data_format: str | None = None,
               question_column: str = "question", answer_column: str = "answer",
               solution_column: str = "solution") -> MathDataset | ChatDataset:
    """Every split read in the one format its columns show (all splits must agree)."""
    from .local_data import math_rows  # the question/answer reader lives with the other table readers

    formats = {split: detect_format(source, columns, question_column=question_column, answer_column=answer_column,
                                    task=task, asked=data_format)
               for split, (source, columns, _) in sources.items()}
    if len(set(formats.values())) > 1:
        raise DatasetError("the splits hold different formats: " + ", ".join(f"{s}: {f}" for s, f in formats.items()))
    fmt = next(iter(formats.values()))
    if fmt == QUESTION_ANSWER:
        return MathDataset({split: math_rows(source, read((question_column, answer_column)), question_column,
                                             answer_column, solution_column)
                            for split, (source, _, read) in sources.items()})
    required = ("messages",) if fmt == MESSAGES else ("prompt", "completion")
    splits = {split: chat_rows(source, read(required), fmt, answer_column) for split, (source, _, read) in sources.items()}
    kinds = {split: "messages" in rows[0] for split, rows in splits.items()}
    if fmt == PROMPT_COMPLETION and len(set(kinds.values())) > 1:
        raise DatasetError("prompt/completion splits mix text and lists of messages: "
                           + ", ".join(f"{s}: {'messages' if k else 'text'}" for s, k in kinds.items()))
    conversational = fmt == MESSAGES or next(iter(kinds.values()))
    return ChatDataset(splits, MESSAGES if conversational else PROMPT_COMPLETION)


def chat_rows(source: object, records: Iterable[tuple[str, dict]], fmt: str = MESSAGES,
              answer_column: str = "answer") -> list[dict]:
    """("where", row) records -> ChatDataset rows (see ChatDataset), every row checked. Conversational
    prompt/completion rows become messages = prompt + completion, trained from the completion on."""
    rows, text_rows = [], None
    for where, row in records:
        answer = row.get(answer_column)
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DatasetError(f"{where}: {answer_column!r} must be a text or a number, got {type(answer).__name__}")
        answer = None if answer is None or str(answer).strip() == "" else str(answer).strip()
        if fmt == MESSAGES:
            rows.append({"messages": check_messages(where, row["messages"], "messages"), "train_from": 0,
                         "answer": answer, "where": where})
            continue
        prompt, completion = row["prompt"], row["completion"]
        is_text = isinstance(prompt, str)
        if text_rows is None:
            text_rows = is_text
        elif is_text != text_rows:
            raise DatasetError(f"{where}: 'prompt' is {'text' if is_text else 'a list'} here but "
                               f"{'text' if text_rows else 'a list of messages'} in earlier rows; use one format")
        if is_text:
            if not isinstance(completion, str):
                raise DatasetError(f"{where}: 'prompt' is text, so 'completion' must be text too, "
                                   f"got {type(completion).__name__}")
            if not completion.strip():
                raise DatasetError(f"{where}: empty 'completion': nothing to learn from")
            rows.append({"prompt": prompt, "completion": completion, "answer": answer, "where": where})
        else:
            prompt = check_messages(where, prompt, "prompt", need_assistant=False)
            completion = check_messages(where, completion, "completion")
            rows.append({"messages": prompt + completion, "train_from": len(prompt), "answer": answer, "where": where})
    if not rows:
        raise DatasetError(f"{source}: no examples (the file has no data rows)")
    return rows


def check_messages(where: object, messages, column: str, *, need_assistant: bool = True) -> list[dict]:
    """A list of {role, content} messages with known roles and text content (and an assistant turn)."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: {column!r} must be a non-empty list of {{\"role\", \"content\"}} messages, "
                           f"got {type(messages).__name__ if messages != [] else 'an empty list'}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DatasetError(f"{where}: {column}[{i}] must be an object with \"role\" and \"content\", got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DatasetError(f"{where}: {column}[{i}] has an unknown role {m['role']!r}; roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DatasetError(f"{where}: {column}[{i}] content must be text, got {type(m['content']).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})  # hub rows carry None for absent keys
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DatasetError(f"{where}: {column!r} has no assistant message, so nothing to learn from; "
                           "every conversation needs at least one {\"role\": \"assistant\"} turn")
    return out
