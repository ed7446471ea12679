"""The saved adapter's README.md says what loading it needs, and `config.peft_type` behaves like a member of
PEFT's PeftType where PEFT reads it."""

from __future__ import annotations

import copy
import json
import pickle
import re

import pytest
import torch

import gpart
from conftest import MLP
from gpart.model_card import BEGIN, END
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.hotswap import hotswap_adapter


def _model(seed=5, d=30):
    config = gpart.GPartConfig(d=d, seed=seed, init_scale=0.5, target_modules=["lin0", "lin1"])
    return get_peft_model(MLP(), config)


def _section(text: str) -> str:
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    return text[text.index(BEGIN): text.index(END)]


def test_the_card_names_method_settings_versions_and_how_to_install_and_load(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    section = _section(text)
    for line in ["| method | GPart: End-to-End Isometric Fine-Tuning via Global Parameter Partitioning, "
                 "[arXiv 2605.14841](https://arxiv.org/abs/2605.14841) |",
                 "| d (length of theta, the trained values) | 30 |", "| seed | 5 |", "| projection | partition |",
                 f"| partition | {gpart.ALGORITHM}, version {gpart.VERSION} |",
                 f"| D (adapted weights) | {model.peft_config['default'].D:,} |",
                 f"| saved by | gpart {gpart.__version__} |",
                 f'pip install "gpart>={gpart.__version__}"',
                 'model = PeftModel.from_pretrained(base_model, "path/to/this/folder")']:
        assert line in section.splitlines(), line
    # right after PEFT's metadata block, before its long template, which stays
    assert text.startswith("---\nlibrary_name: peft\n---\n\n" + BEGIN)
    assert "### Framework versions" in text
    assert json.loads((tmp_path / "adapter_config.json").read_text())["gpart_version"] == gpart.__version__


def test_the_cards_load_line_loads_the_adapter(tmp_path):
    base = MLP()
    weights = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, gpart.GPartConfig(d=30, init_scale=0.5, target_modules=["lin0", "lin1"]))
    model.save_pretrained(tmp_path)
    code = re.search(r"```python\n(.*?)```", _section((tmp_path / "README.md").read_text()), re.S).group(1)
    base_model = MLP()
    base_model.load_state_dict(weights)
    scope = {"PeftModel": PeftModel, "base_model": base_model}
    exec(code.replace("path/to/this/folder", str(tmp_path)), scope)
    x = torch.randn(4, 10)
    with torch.no_grad():
        assert torch.equal(scope["model"](x), model(x))


def test_saving_again_updates_the_section_and_keeps_the_users_card(tmp_path):
    users = "---\nlicense: mit\n---\n\n# My adapter\n\nTrained on my data.\n"
    (tmp_path / "README.md").write_text(users)
    _model(seed=5).save_pretrained(tmp_path)
    _model(seed=7, d=40).save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    section = _section(text)
    assert "| seed | 7 |" in section and "| d (length of theta, the trained values) | 40 |" in section
    assert "license: mit" in text and "# My adapter\n\nTrained on my data." in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]  # no temporary file left


def test_every_adapter_folder_gets_its_own_card(tmp_path):
    model = _model(seed=5)
    model.add_adapter("other", gpart.GPartConfig(d=12, seed=8, target_modules=["lin1"]))
    model.save_pretrained(tmp_path)
    assert "| seed | 5 |" in _section((tmp_path / "README.md").read_text())
    assert "| seed | 8 |" in _section((tmp_path / "other" / "README.md").read_text())


def test_a_card_without_metadata_gets_the_section_first(tmp_path):
    (tmp_path / "README.md").write_text("Notes.\n")
    gpart.GPartConfig(d=3).save_pretrained(str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(BEGIN) and text.endswith(END + "\n\nNotes.\n")
    assert "D (adapted weights)" not in text  # a config not yet applied to a model has no D


# -- peft_type ---------------------------------------------------------------------------------------


def test_peft_type_is_the_string_gpart_with_value_and_name():
    peft_type = gpart.GPartConfig(d=3).peft_type
    assert peft_type == "GPART" and isinstance(peft_type, str) and hash(peft_type) == hash("GPART")
    assert (peft_type.value, peft_type.name) == ("GPART", "GPART")
    assert type(peft_type.value) is str
    assert json.dumps({"peft_type": peft_type}) == '{"peft_type": "GPART"}'
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is gpart.GPartConfig
    for clone in (copy.deepcopy(peft_type), pickle.loads(pickle.dumps(peft_type))):
        assert clone.value == "GPART"


def test_saved_and_committed_configs_load_with_the_peft_type_member_like_string(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "saved-adapters" / "v1"
    _model().save_pretrained(tmp_path)
    for path in (tmp_path, fixture):
        config = PeftConfig.from_pretrained(str(path))
        assert type(config) is gpart.GPartConfig and config.peft_type.value == "GPART"
    assert config.gpart_version == gpart.__version__  # the fixture records none: filled in, as PEFT does


def test_peft_code_that_reads_peft_type_value(tmp_path, capsys):
    model = _model()
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 30 || all params: ")
    with pytest.raises(ValueError, match="`peft_type` 'GPART' is not compatible with the `PeftMixedModel`"):
        get_peft_model(MLP(), gpart.GPartConfig(d=3, target_modules=["lin0"]), mixed=True)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Hotswapping only supports .* but GPART was passed"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default")
