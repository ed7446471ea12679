"""Registration with stock PEFT.

PEFT's `register_peft_method` requires a member of its closed `PeftType` enum, which a third-party
package cannot add. PeftType is a `str` enum, so PEFT's lookup tables accept the plain string "GPART";
we write those tables directly (the only route that needs no fork of PEFT).

`import gpart` calls `register`; so does the autoload hook that gpart installs (src/_gpart_autoload.py)
right after peft is imported, in a process that never imports gpart.
"""

from __future__ import annotations

from .config import PEFT_TYPE, GPartConfig
from .model import GPartModel


def register() -> None:
    """Make PEFT know the "GPART" method. Idempotent."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = GPartConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = GPartModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = GPartModel.prefix
