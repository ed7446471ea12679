"""One entry point for data: a built-in dataset by name, the user's own file or folder, or a Hugging Face hub id."""
from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

from .builtin_data import BUILTIN_DATASETS
from .data_types import TASK_GROUPS, TASKS, Dataset
from .errors import DatasetError
from .hub_data import is_hub_id, load_hub
from .local_data import load_local


def load_dataset(name_or_path: str | Path, task: str | None = None, *, seed: int = 0,
                 text_column: str = "text", label_column: str = "label",
                 label_names: Sequence[str] | None = None, image_size: int | tuple[int, int] | None = None,
                 image_column: str | None = None, question_column: str = "question", answer_column: str = "answer",
                 solution_column: str = "solution", data_format: str | None = None) -> Dataset:
    """Load a dataset as a TextDataset, ImageDataset, MathDataset or ChatDataset.

    A built-in name (see BUILTIN_DATASETS) wins over a same-named folder; write ./name for the folder.
    Anything else that is not an existing path but reads `org/name` or `org/name:config` is a Hugging Face
    hub dataset (gpart.assets.hub_data: from the local `datasets` cache unless HF_HUB_OFFLINE=0).
    `task` checks a built-in's kind and picks how a local path or hub dataset is read (inferred when
    None). `seed` drives the split of built-ins that have none of their own. The remaining options name
    the columns of local files and hub datasets (`image_column`: hub datasets only; default: the one
    column of images). Task "causal-lm" accepts math and chat data alike: a file's format is
    `data_format` (messages | prompt-completion | question-answer) or the one its columns show.
    """
    if task is not None and task not in TASKS and task not in TASK_GROUPS:
        raise DatasetError(f"unknown task {task!r}; tasks: {', '.join([*TASKS, *TASK_GROUPS])}")
    builtin = BUILTIN_DATASETS.get(str(name_or_path))
    if builtin is not None:
        if task is not None and builtin.task not in TASK_GROUPS.get(task, (task,)):
            raise DatasetError(f"built-in dataset {builtin.name!r} is for {builtin.task}, not {task}")
        return builtin.load(seed)
    path = Path(name_or_path).expanduser()
    if not path.exists() and not path.parent.exists() and is_hub_id(str(name_or_path)):  # dir/typo.csv stays a path
        return load_hub(str(name_or_path), task, text_column=text_column, label_column=label_column,
                        label_names=label_names, image_size=image_size, image_column=image_column,
                        question_column=question_column, answer_column=answer_column, solution_column=solution_column,
                        data_format=data_format)
    if not path.exists():
        raise DatasetError(f"{str(name_or_path)!r} is neither a built-in dataset, an existing file or folder, nor a "
                           f"Hugging Face hub id (org/name[:config]). Built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    return load_local(path, task, text_column=text_column, label_column=label_column, label_names=label_names,
                      image_size=image_size, question_column=question_column, answer_column=answer_column,
                      solution_column=solution_column, data_format=data_format)


def list_datasets() -> list[tuple[str, str, str]]:
    """(name, task, description) of every built-in dataset."""
    return [(d.name, d.task, d.description) for d in BUILTIN_DATASETS.values()]
