"""gpart: GPart fine-tuning (arXiv 2605.14841) as a method of stock Hugging Face PEFT.

Importing this package registers the method "GPART" with PEFT, so that `get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know it. Where gpart is installed, importing
peft does the same (src/_gpart_autoload.py), so loading an adapter needs no `import gpart`.
"""

from .config import PEFT_TYPE, GPartConfig
from .export import merge_and_dequantize
from .layers import GPartLayer, clear_gpart_cache
from .lr import LearningRateRuleError, LearningRateWarning, gpart_lr, gpart_param_groups, lr_factor
from .model import GPartModel, LayoutMismatchError, layout_fingerprint
from .partition import ALGORITHM, VERSION, VERSIONS, Partition, PartitionError
from .registration import register
from .version import __version__

__all__ = ["ALGORITHM", "VERSION", "VERSIONS", "GPartConfig", "GPartLayer", "GPartModel", "LayoutMismatchError",
           "LearningRateRuleError", "LearningRateWarning", "Partition", "PartitionError", "clear_gpart_cache",
           "gpart_lr", "gpart_param_groups", "layout_fingerprint", "lr_factor", "merge_and_dequantize", "register"]

register()
