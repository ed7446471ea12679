"""The GPart section of an adapter folder's README.md (its model card).

PEFT writes a generic card; someone who finds the folder without gpart needs to learn which package,
which version and which settings the adapter needs, and the two lines that install and load it. The
section sits between two markers, so saving again replaces it and keeps whatever else the card says.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .version import __version__

BEGIN = "<!-- gpart model card: begin -->"
END = "<!-- gpart model card: end -->"


def card_section(config) -> str:
    """The GPart section for `config` (a GPartConfig), markers included."""
    rows = [
        ("method", "GPart: End-to-End Isometric Fine-Tuning via Global Parameter Partitioning, "
                   "[arXiv 2605.14841](https://arxiv.org/abs/2605.14841)"),
        ("d (length of theta, the trained values)", f"{config.d:,}"),
        ("seed", str(config.seed)),
        ("projection", config.projection),
        ("partition", f"{config.partition_algorithm}, version {config.partition_version}"),
    ]
    if config.D is not None:
        rows.append(("D (adapted weights)", f"{config.D:,}"))
    if config.base_model_name_or_path:
        rows.append(("base model", f"`{config.base_model_name_or_path}`"))
    rows.append(("saved by", f"gpart {__version__}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""{BEGIN}
## GPart adapter

One vector theta of d values, mapped into the adapted weights by a seeded, balanced, isometric
partition (GPart). Loading it needs gpart next to PEFT; once gpart is installed, PEFT's own loaders
(`PeftModel.from_pretrained`, `AutoPeftModel*`, `load_adapter`) know the method without `import gpart`.

| | |
|---|---|
{table}

```bash
pip install "gpart>={__version__}"
```

```python
model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
{END}"""


def update_model_card(directory: str, config) -> None:
    """Add or replace the GPart section of `directory`/README.md, keeping the rest; written atomically."""
    path = os.path.join(directory, "README.md")
    text = Path(path).read_text(encoding="utf-8") if os.path.exists(path) else ""
    section = card_section(config)
    start = text.find(BEGIN)
    stop = text.find(END, start)
    if start >= 0 and stop >= 0:
        text = text[:start] + section + text[stop + len(END):]
    else:  # first thing after the YAML metadata, where a reader of PEFT's long template still sees it
        head, body = _split_metadata(text)
        text = head + section + "\n" + ("\n" + body.lstrip("\n") if body.strip() else "")
    temporary = f"{path}.{os.getpid()}-{uuid.uuid4().hex}.tmp"  # a reader sees the old card or the new one
    try:
        with open(temporary, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _split_metadata(text: str) -> tuple[str, str]:
    """(the card's YAML metadata block with the blank line after it, or "", the rest)."""
    if text.startswith("---\n"):
        close = text.find("\n---\n", 3)
        if close >= 0:
            return text[: close + 5] + "\n", text[close + 5:]
    return "", text
