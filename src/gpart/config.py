"""GPartConfig: the PEFT config of a GPart adapter."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .grouping import GROUPINGS
from .model_card import update_model_card
from .partition import ALGORITHM, VERSION, check_version
from .projection import PROJECTIONS
from .scope import SCOPES
from .version import __version__


class PeftTypeName(str):
    """The string "GPART" with the `.name` and `.value` of a `PeftType` member, which PEFT reads in places.

    PEFT's enum is closed to third-party methods; a str subclass equals and hashes like "GPART" (PEFT's
    tables are keyed by it) and serialises to JSON as "GPART".
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    name = value


PEFT_TYPE = PeftTypeName("GPART")

# What a saved adapter_config.json must state for its theta to mean anything.
SAVED_REQUIRED = ("d", "seed", "partition_algorithm", "partition_version", "D", "layout", "layout_fingerprint")
ALLOW_PICKLE_ENV = "GPART_ALLOW_PICKLE"
# Options added after adapters were first saved: written only when they differ from these defaults.
OPTIONAL_DEFAULTS = {"partition_scope": "global", "grouping": "random", "grouping_fingerprint": None}


@dataclass
class GPartConfig(PeftConfig):
    """Configuration of a GPart adapter (arXiv 2605.14841); the adapter is theta plus this config.

    theta, of length `d`, is mapped into every adapted tensor through a seeded, balanced, isometric partition
    P (P^T P = I_d). Each field's `help` says what it is; docs/api.md has the table, docs/method.md the
    projection, scope and grouping options. The fields "filled in automatically" are written when the
    adapter is created and checked when it is loaded: do not set them by hand.
    """

    d: Optional[int] = field(default=None, metadata={"help": "Length of theta (trainable parameters), 1 <= d <= D."})
    seed: int = field(default=0, metadata={"help": "Seed of the partition."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffix match), a regex or 'all-linear'; None: per model type."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Parameters to adapt."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer pattern."})
    partition_bias: bool = field(default=False, metadata={"help": "Include biases in the partition."})
    dropout: float = field(default=0.0, metadata={"help": "DropConnect probability on Delta_W."})
    init_scale: float = field(default=0.0, metadata={"help": "Std of theta's initial values (0: zero init)."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained in full."})
    projection: str = field(default="partition", metadata={"help": "partition (GPart) or fastfood (ablation)."})
    partition_scope: str = field(
        default="global", metadata={"help": "global, or transformer_block: one partition per numbered block."})
    grouping: str = field(
        default="random", metadata={"help": "random, or signed_magnitude: groups from W0 (experimental)."})
    column_gain_ratio: float = field(default=1.0, metadata={"help": "Column gain max/min ratio (1: isometric)."})
    bias: str = field(default="none", metadata={"help": "Base biases stay frozen; see partition_bias."})
    partition_algorithm: str = field(default=ALGORITHM, metadata={"help": "Filled in automatically."})
    partition_version: int = field(default=VERSION, metadata={"help": "Filled in automatically."})
    D: Optional[int] = field(default=None, metadata={"help": "Filled in automatically: number of adapted weights."})
    layout: Optional[list] = field(default=None, metadata={"help": "Filled in automatically: [name, shape] list."})
    layout_fingerprint: Optional[str] = field(default=None, metadata={"help": "Filled in automatically."})
    grouping_fingerprint: Optional[str] = field(default=None, metadata={"help": "Filled in automatically."})
    gpart_version: Optional[str] = field(default=None, metadata={"help": "gpart version; leave empty to auto-fill."})

    def __new__(cls, *args, **kwargs):
        # PeftConfig.from_pretrained builds configs from saved fields and, when one is unknown, drops it with a
        # warning. For GPart that field may change the update, so a saved config (it names its peft_type) with
        # fields this gpart does not know is refused on every path that builds it.
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown and "peft_type" in kwargs:
            raise ValueError(f"adapter_config.json has fields this gpart ({__version__}) does not know: {unknown}; "
                             f"{_upgrade_hint(kwargs.get('gpart_version'))}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.d is None:
            raise ValueError("GPartConfig needs d, the number of trainable parameters, e.g. GPartConfig(d=23040).")
        if not _is_int(self.d):
            raise ValueError(f"GPartConfig.d must be an integer, got {self.d!r} ({type(self.d).__name__}).")
        if self.d <= 0:
            raise ValueError(f"GPartConfig.d must be a positive integer, got {self.d}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"GPartConfig.seed must be an integer in [0, 2**63), got {self.seed!r}.")
        for name in ("dropout", "init_scale"):
            value = getattr(self, name)
            if not _is_number(value) or value != value:
                raise ValueError(f"GPartConfig.{name} must be a number, got {value!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPartConfig.dropout must be in [0, 1), got {self.dropout}.")
        if float(self.init_scale) < 0.0:
            raise ValueError(f"GPartConfig.init_scale must be >= 0, got {self.init_scale}.")
        for name, choices in (("projection", PROJECTIONS), ("partition_scope", SCOPES), ("grouping", GROUPINGS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPartConfig.{name}={getattr(self, name)!r} is not supported; choose one of "
                                 f"{', '.join(choices)}.")
        if self.grouping != "random" and (self.projection, self.column_gain_ratio, self.partition_scope) != (
                "partition", 1.0, "global"):
            raise ValueError(f"GPartConfig.grouping={self.grouping!r} applies to the global isometric partition only "
                             "(projection='partition', column_gain_ratio=1, partition_scope='global').")
        ratio = self.column_gain_ratio
        if not _is_number(ratio) or not 1.0 <= ratio < float("inf"):
            raise ValueError(f"GPartConfig.column_gain_ratio must be a number >= 1 (1: isometric), got {ratio!r}.")
        if self.projection != "partition" and ratio != 1.0:
            raise ValueError(f"GPartConfig.column_gain_ratio={ratio} applies to projection='partition' only; "
                             f"projection={self.projection!r} takes none.")
        if self.bias != "none":
            raise ValueError(f"GPartConfig.bias={self.bias!r} is not supported: GPart keeps base biases frozen. Use "
                             "partition_bias=True to adapt biases through theta, or modules_to_save to train a module "
                             "in full.")
        if self.partition_algorithm != ALGORITHM:
            raise ValueError(f"This adapter uses partition algorithm {self.partition_algorithm!r}; gpart "
                             f"{__version__} knows {ALGORITHM!r}. Loading it would silently change the update, so it "
                             f"is refused; {_upgrade_hint(self.gpart_version)}")
        check_version(self.partition_version, _upgrade_hint(self.gpart_version))
        if self.gpart_version is None:
            self.gpart_version = __version__
        if not isinstance(self.gpart_version, str):
            raise ValueError(f"GPartConfig.gpart_version must be a version string, got {self.gpart_version!r}.")
        for name in ("target_modules", "exclude_modules", "target_parameters", "modules_to_save", "layers_pattern"):
            _check_names(name, getattr(self, name), allow_str=name not in ("target_parameters", "modules_to_save"))
        layers = self.layers_to_transform
        if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
            raise ValueError(f"GPartConfig.layers_to_transform must be an int or a list of ints, got {layers!r}.")
        if not isinstance(self.partition_bias, bool):
            raise ValueError(f"GPartConfig.partition_bias must be True or False, got {self.partition_bias!r}.")
        for name in ("target_modules", "exclude_modules"):  # stored as sets, as PEFT's own configs do
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (a regex).")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a str (a regex).")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When layers_pattern is given, layers_to_transform must be given too.")

    def to_dict(self) -> dict:
        # options added after the first release are left out at their defaults, so an adapter that does not
        # use them stays loadable by a gpart that predates them
        out = super().to_dict()
        for name, default in OPTIONAL_DEFAULTS.items():
            if out.get(name) == default:
                del out[name]
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        # PeftModel.from_pretrained and load_adapter come through here before they touch the model. Unpickling a
        # stranger's file can run code, and PEFT falls back to adapter_model.bin when there is no safetensors
        # file: for GPart that needs the explicit opt-in GPART_ALLOW_PICKLE=1.
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        weights = os.path.join(path, "adapter_model.safetensors")
        if os.path.isdir(path) and not os.path.exists(weights) and os.environ.get(ALLOW_PICKLE_ENV) != "1":
            raise ValueError(f"{path} holds no adapter_model.safetensors. gpart loads adapters from safetensors only, "
                             "because a pickled file can run code when loaded. If you trust this adapter, set "
                             f"{ALLOW_PICKLE_ENV}=1 to load its adapter_model.bin.")
        _check_weights_file(weights)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        # PEFT saves each adapter's config into its folder after its own README.md template: the place to tell a
        # reader without gpart what the adapter needs
        super().save_pretrained(save_directory, **kwargs)
        update_model_card(save_directory, self)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Validate a saved adapter_config.json before anything is built from it (unknown fields: `__new__`)."""
        kwargs = super().check_kwargs(**kwargs)
        missing = [k for k in SAVED_REQUIRED if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"adapter_config.json lacks {missing}, without which the partition that theta indexes is "
                             "unknown. The file is truncated or was not written by gpart.")
        _check_saved_types(kwargs)
        return kwargs


def _check_weights_file(path: str) -> None:
    """Refuse a damaged adapter_model.safetensors here: PEFT wraps the base model's layers before it reads
    the weights, so a file that fails to load there would leave the model half-adapted."""
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):  # parses the header and checks the data it names is all there
            pass
    except Exception as error:
        raise ValueError(f"{path} is damaged or truncated ({error}); the model was left untouched. Save or copy "
                         "the adapter again.") from None


def _upgrade_hint(saved_by: Optional[str]) -> str:
    """The end of a message about an adapter this gpart cannot load: which gpart it needs."""
    if isinstance(saved_by, str) and saved_by != __version__:
        return f"it was saved by gpart {saved_by}: upgrade with pip install -U 'gpart>={saved_by}'."
    return "it was saved by a newer gpart: upgrade with pip install -U gpart."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_names(field_name: str, value, allow_str: bool = True) -> None:
    """A module/parameter-name field: None, a list (or set) of strings, or (where allowed) one string."""
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return
    kinds = "a string or a list of strings" if allow_str else "a list of strings"
    raise ValueError(f"GPartConfig.{field_name} must be {kinds}, got {value!r}.")


def _check_saved_types(kwargs: dict) -> None:
    """Types of the partition fields of a saved config; raise ValueError naming the first bad one."""
    for name in ("d", "seed", "D", "partition_version"):
        if not _is_int(kwargs[name]):
            raise ValueError(f"adapter_config.json: {name} must be an integer, got {kwargs[name]!r}.")
    if not isinstance(kwargs["partition_algorithm"], str):
        raise ValueError("adapter_config.json: partition_algorithm must be a string.")
    layout = kwargs["layout"]
    ok = isinstance(layout, list) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
        and isinstance(e[1], list) and all(_is_int(s) and s >= 0 for s in e[1])
        for e in layout
    )
    if not ok:
        raise ValueError("adapter_config.json: layout must be a list of [name, [sizes...]] entries.")
    fp = kwargs["layout_fingerprint"]
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise ValueError("adapter_config.json: layout_fingerprint must be a sha256 hex digest.")
    for name in ("projection", "partition_scope", "grouping"):
        if name in kwargs and not isinstance(kwargs[name], str):
            raise ValueError(f"adapter_config.json: {name} must be a string.")
    for name in ("dropout", "init_scale", "column_gain_ratio"):
        if name in kwargs and not _is_number(kwargs[name]):
            raise ValueError(f"adapter_config.json: {name} must be a number, got {kwargs[name]!r}.")
