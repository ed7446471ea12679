"""A GPart adapter loads through stock PEFT in a process that never imports gpart (gpart-autoload.pth and
src/_gpart_autoload.py, installed with gpart), start-up stays light, and a broken gpart never breaks peft.

Each check runs a fresh interpreter of this environment, so it tests what is installed here (`make setup`
installs gpart editable; a wheel carries the same two files)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import gpart
from conftest import tiny_llama
from peft import PeftModel, get_peft_model

SITE = Path(sysconfig.get_paths()["purelib"])


def _python(code: str, *args: str, env: dict | None = None, cwd: Path = Path(SITE.anchor), flags=()):
    """Run `code` in a fresh interpreter of this environment, from a folder with no gpart in it."""
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    if "PYTHONPATH" not in (env or {}):
        child_env.pop("PYTHONPATH", None)  # gpart must come from the installed environment, not from src/
    return subprocess.run([sys.executable, *flags, "-c", code, *args], capture_output=True, text=True, env=child_env,
                          cwd=cwd, timeout=300)


def test_the_hook_is_installed_with_gpart():
    src = Path(__file__).resolve().parents[1] / "src"
    for name in ("gpart-autoload.pth", "_gpart_autoload.py"):  # copies, in an editable install too
        installed = SITE / name
        assert installed.exists() and installed.read_text() == (src / name).read_text(), (
            f"{installed} is missing or differs from src/{name}: reinstall gpart (pip install -e .)"
        )


def test_start_up_only_adds_a_finder():
    code = "import json, sys; print(json.dumps([sorted(sys.modules), [type(f).__name__ for f in sys.meta_path]]))"
    result = _python(code)
    assert result.returncode == 0, result.stderr
    modules, finders = json.loads(result.stdout)
    assert finders.count("_PeftFinder") == 1
    assert "_gpart_autoload" in modules
    heavy = {"torch", "peft", "transformers", "numpy", "gpart", "importlib.util", "warnings"}
    assert heavy.isdisjoint(modules), heavy.intersection(modules)


def _api_doc_snippet() -> str:
    """The Python snippet of docs/api.md's section "Loading without `import gpart`"."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    section = text.split("## Loading without `import gpart`\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


CHILD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file

base_dir, first, second, out, threads, doc_snippet = sys.argv[1:]
assert "gpart" not in sys.modules
exec(doc_snippet)  # docs/api.md's, as written: it loads ./out, which is `first`
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoModelForCausalLM

torch.set_num_threads(int(threads))
ids = load_file(out)["ids"]
config = PeftConfig.from_pretrained(first)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), first)
auto = AutoPeftModelForCausalLM.from_pretrained(first)
with torch.no_grad():
    logits = {"peft_model": model(ids).logits, "auto": auto(ids).logits}
    model.load_adapter(second, adapter_name="second")
    model.set_adapter("second")
    logits["load_adapter"] = model(ids).logits
save_file(logits, out)
print(json.dumps({"config": type(config).__module__ + "." + type(config).__name__, "d": config.d,
                  "peft_type": config.peft_type.value}))
"""


def _saved_llama(tmp_path: Path):
    """A tiny Llama saved as a base (so an adapter records where it lives) and two GPart adapters on it."""
    tiny_llama(seed=3).save_pretrained(tmp_path / "base")
    dirs = []
    for name, seed in (("out", 1), ("second", 2)):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        config = gpart.GPartConfig(d=64, seed=seed, init_scale=0.3, target_modules=["q_proj", "v_proj"],
                                   task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    return dirs


def test_stock_peft_entry_points_load_an_adapter_without_import_gpart(tmp_path):
    first, second = _saved_llama(tmp_path)
    ids = torch.randint(0, 120, (2, 7))
    here = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), first)
    with torch.no_grad():
        reference = here(ids).logits
        here.load_adapter(second, adapter_name="second")
        here.set_adapter("second")
        reference_second = here(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
    assert not torch.allclose(reference, plain) and not torch.allclose(reference_second, reference)

    out = tmp_path / "io.safetensors"
    save_file({"ids": ids}, out)
    result = _python(CHILD, str(tmp_path / "base"), str(first), str(second), str(out), str(torch.get_num_threads()),
                     _api_doc_snippet(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"config": "gpart.config.GPartConfig", "d": 64, "peft_type": "GPART"}
    got = load_file(out)
    assert torch.equal(got["peft_model"], reference)
    assert torch.equal(got["auto"], reference)
    assert torch.equal(got["load_adapter"], reference_second)


def _warning(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "gpart is installed but could not be imported" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "pip install --force-reinstall gpart" in lines[0]
    return lines[0]


def test_a_broken_gpart_turns_into_a_warning_and_peft_still_imports(tmp_path):
    (tmp_path / "gpart").mkdir()
    (tmp_path / "gpart" / "__init__.py").write_text("raise RuntimeError('deliberately broken')\n")
    code = ("import peft; from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m; "
            "print(peft.__version__, 'GPART' in m)")
    result = _python(code, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [__import__("peft").__version__, "False"]
    assert "RuntimeError: deliberately broken" in _warning(result.stderr)


@pytest.mark.parametrize("flags", [[], ["-W", "error"]])
def test_a_half_installed_gpart_turns_into_a_warning(tmp_path, flags):
    # gpart/__init__.py without the rest of the package; a stand-in peft keeps this check fast (the test above
    # imports the real one). With warnings made errors, peft must still import.
    for package, init in (("gpart", ""), ("peft", "VERSION = 'stand-in'\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(init)
    code = "import peft, sys; print(peft.VERSION, any(type(f).__name__ == '_PeftFinder' for f in sys.meta_path))"
    result = _python(code, env={"PYTHONPATH": str(tmp_path)}, flags=flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["stand-in", "False"]  # the finder removed itself
    assert "ModuleNotFoundError: No module named 'gpart.registration'" in _warning(result.stderr)


@pytest.mark.parametrize("gpart_init,code", [
    # gpart's own import imports peft and registers itself: the hook must not do it again
    ("import peft\nfrom .registration import register\nregister()\n", "import gpart, peft"),
    ("", "import gpart, peft"),  # gpart imported without touching peft: peft's import registers it
    ("", "import importlib.util; importlib.util.find_spec('peft'); import peft"),  # a library probing for peft
])
def test_gpart_is_registered_exactly_once(tmp_path, gpart_init, code):
    (tmp_path / "gpart").mkdir()
    (tmp_path / "gpart" / "__init__.py").write_text(gpart_init)
    (tmp_path / "gpart" / "registration.py").write_text("def register():\n    print('registered')\n")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text("")
    result = _python(code, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["registered"]
