"""The docs as files: every relative link resolves, no page is oversized, and the GPU check runs every CUDA test."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("studies/**/*.md"),
                *ROOT.glob("benchmarks/**/*.md")])
MAX_PAGE_BYTES = 200_000  # a page this large is a generated dump or a broken edit, not documentation
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_targets(text: str) -> list[str]:
    """Targets of the markdown links and images that point into the repo (no URL, no bare #anchor)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def broken_links(page: Path) -> list[str]:
    return [t for t in relative_targets(page.read_text()) if not (page.parent / t.split("#")[0]).exists()]


def test_link_finder_sees_links_and_images_but_not_urls_anchors_or_code():
    text = ("[a](docs/a.md) ![b](img/b.png \"title\") [c](https://example.invalid/x) [d](#top) "
            "[e](f.md#part) `[g](h.md)`\n```\n[i](j.md)\n```\n")
    assert relative_targets(text) == ["docs/a.md", "img/b.png", "f.md#part"]


def test_a_missing_target_is_reported(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#x) [gone](missing.md) ![fig](sub/fig.png)")
    assert broken_links(page) == ["missing.md", "sub/fig.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} links to files that are not in the repo"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_is_not_oversized(page):
    size = page.stat().st_size
    assert size <= MAX_PAGE_BYTES, (f"{page.relative_to(ROOT)} is {size:,} bytes (limit {MAX_PAGE_BYTES:,}): "
                                    "split it, or look for a broken edit that repeated text")


def test_gpu_check_runs_every_file_with_cuda_tests():
    cuda_mark = re.compile(r"^(@pytest\.mark\.cuda|pytestmark = \[?pytest\.mark\.cuda)\b", re.M)
    marked = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("tests/test_*.py") if cuda_mark.search(p.read_text())}
    listed = re.search(r'^CUDA_TESTS="([^"]*)"', (ROOT / "benchmarks" / "gpu_check.sh").read_text(), re.M)
    assert {"tests/test_cuda.py", "tests/test_quantized.py"} <= marked
    assert listed and not marked - set(listed.group(1).split()), \
        f"benchmarks/gpu_check.sh misses {sorted(marked - set(listed.group(1).split()))}"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_committed_study_runs_name_no_machine_path():
    """A study's runs keep their metrics.json in git: no value in one may be an absolute path of the machine
    that ran it (gpart train names its best checkpoint relative to the run folder)."""
    import json

    files = sorted(ROOT.glob("studies/*/runs/**/metrics.json"))
    absolute = [f"{f.relative_to(ROOT)}: {s}" for f in files for s in _strings(json.loads(f.read_text()))
                if s.startswith("/") and len(s) > 1]
    assert not absolute, absolute


def test_architecture_core_size_table_matches_the_committed_reports():
    """docs/architecture.md quotes the core's size from benchmarks/core_size.py's committed reports."""
    import json

    text = (ROOT / "docs" / "architecture.md").read_text()
    for name in ("core_size-6ee8381", "core_size"):
        report = json.loads((ROOT / "docs" / "benchmarks" / f"{name}.json").read_text())
        row = next(line for line in text.splitlines() if f"]({Path('benchmarks') / name}.md)" in line)
        assert f"| {len(report['modules'])} | {report['lines']:,} | {report['code_lines']:,} |" in row, (name, row)


def test_llm_generation_tables_match_the_committed_reports():
    """docs/llm.md's bf16 / NF4 generation table: CPU ms per token and the ratio to LoRA from each report, and
    the quoted paired ratio over the merged model from the bf16 one."""
    import json

    text = (ROOT / "docs" / "llm.md").read_text().split("**bf16 and 4-bit bases**")[1]
    reports = [json.loads((ROOT / "docs" / "benchmarks" / f"generation-smollm2-135m-qkvo-d131072-{name}.json").read_text())
               for name in ("bfloat16", "nf4-dq")]
    rows = {"base model": "base", "GPart unmerged, eval cache (default)": "gpart",
            "GPart unmerged, cache off": "gpart-uncached", "GPart merged": "gpart-merged", "LoRA r=8 unmerged": "lora-r8"}
    for label, method in rows.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.split("|")[2:4]]
        for cell, r in zip(cells, reports):
            ms, ratio = r["summary"][method]["decode_cpu_ms_per_token"], r["ratios"][f"{method}/lora-r8"]["decode_cpu"]
            assert cell == f"{ms:.1f} ({ratio:.2f})", (label, cell)
    paired = reports[0]["paired_cpu"]["gpart/gpart-merged"]
    assert f"{paired['median']:.2f}x the merged model per token" in " ".join(text.split())
