"""GPartModel: the PEFT tuner that injects GPart wrappers and owns theta.

Canonical order (what "position i" means): after an adapter is injected, the wrapped tensors are listed
in the order `model.named_modules()` visits their wrappers; within a wrapper the weight comes first, then
the bias when `partition_bias` is set. Each tensor is flattened in its own row-major storage order (for
transformers' Conv1D that is the (in, out) layout it stores). Concatenating them gives the vector of
length D that the partition splits. The config records D, the [name, shape] list and its sha256
fingerprint, so loading onto a model with a different layout fails loudly instead of silently using a
different partition.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper
from torch import nn

from . import quantization as Q
from .config import GPartConfig
from .functional import TensorSlice
from .grouping import SignedMagnitudeGroups
from .layers import GPartLayer, ParamWrapper, clear_gpart_cache, wrapper_for
from .lr import watch_theta_lr
from .partition import check_sizes
from .projection import make_projection
from .scope import block_names, plan
from .theta import ThetaDict

THETA_KEY = "base_model.gpart_theta"

# PEFT's per-architecture defaults (query/value projections, the paper's GLUE setting), plus vision encoders.
DEFAULT_TARGET_MODULES = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
}


class LayoutMismatchError(ValueError):
    """The model's adapted tensors differ from those the adapter was trained on."""


def layout_fingerprint(layout: list, partition_scope: str = "global", layers_pattern=None) -> str:
    """sha256 of the ordered [name, shape] list, as canonical JSON; under a block scope the scope and every
    tensor's block go into it too (the global scope's fingerprint is the layout's alone, as it always was)."""
    entries = [[name, list(shape)] for name, shape in layout]
    if partition_scope != "global":
        entries = {"partition_scope": partition_scope, "blocks": block_names(layout, layers_pattern), "layout": entries}
    blob = json.dumps(entries, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _clean_name(key: str) -> str:
    """Module key without the `.base_layer` hops that nested wrappers add."""
    return ".".join(part for part in key.split(".") if part != "base_layer")


def _check_adaptable(module: nn.Module, key: str) -> None:
    """Refuse quantized layers other than bitsandbytes', and weights GPart cannot add Delta_W to."""
    reason = Q.unsupported_reason(module)
    if reason is not None:
        raise TypeError(f"GPart cannot adapt '{key}' ({type(module).__module__}.{type(module).__name__}): {reason}. "
                        f"Supported: {Q.SUPPORTED}. Load the model unquantized or with bitsandbytes "
                        "(BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True), or leave this module out with "
                        "exclude_modules.")


class GPartModel(BaseTuner):
    """Injects GPart into a model. Use through `peft.get_peft_model(model, GPartConfig(...))`."""

    prefix: str = "gpart_"
    tuner_layer_cls = GPartLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state = True
    # Eval-mode cache of what the wrappers build from theta (docs/llm.md): None follows GPART_EVAL_CACHE
    # (default on, off in distributed runs); True/False set it for this model. Not saved with the adapter.
    eval_cache: bool | None = None
    gpart_cache_used = False  # set by a wrapper when it keeps something, so train() frees only when needed
    _gpart_grad_while_enabled: list | None = None  # requires_grad flags to restore when adapters are re-enabled

    # -- eval-mode cache -------------------------------------------------------------------------------

    def clear_gpart_cache(self) -> None:
        """Free everything the wrappers keep for eval mode; the next eval forward rebuilds what it needs."""
        clear_gpart_cache(self.model)
        self.gpart_cache_used = False

    def train(self, mode: bool = True):
        if mode and self.gpart_cache_used:
            self.clear_gpart_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda(): the kept tensors would be stale (their keys would miss anyway); free them first
        if self.gpart_cache_used:
            self.clear_gpart_cache()
        return super()._apply(fn, *args, **kwargs)

    # -- injection -----------------------------------------------------------------------------------

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None):
        if "gpart_theta" not in self._modules:
            self.gpart_theta = ThetaDict()  # theta stays float32 when a trainer casts trainables to bf16
            self._gpart_scales: dict = {}
            self._gpart_projections: dict = {}  # adapter -> its projections, one per block of its scope
        if adapter_name in self.gpart_theta:
            raise ValueError(f"An adapter named '{adapter_name}' already exists; choose another name.")
        config = self.peft_config[adapter_name]
        self.gpart_theta[adapter_name] = nn.Parameter(torch.zeros(config.d, device="meta"))
        # what a failed injection or load must restore (PEFT freezes the base model while injecting)
        self._gpart_requires_grad = {adapter_name: [(p, p.requires_grad) for p in model.parameters()]}
        self._gpart_aux_before = {id(m) for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)}
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
            self._finish_adapter(adapter_name, low_cpu_mem_usage)
            Q.disable_cpu_repacking(model)
        except Exception:
            self._abort_adapter(adapter_name)
            raise
        self._set_theta_trainability()
        watch_theta_lr()  # a learning rate far from GPart's rule is reported at the first optimizer step

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, parameter_name=None):
        if parameter_name is not None:
            if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
                target.update_layer(adapter_name, config)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            param = getattr(base, parameter_name, None)
            if not isinstance(param, torch.Tensor) or not (param.dtype.is_floating_point or param.is_meta):
                raise TypeError(f"GPart cannot adapt parameter '{current_key}.{parameter_name}': not a float tensor.")
            new = ParamWrapper(target, adapter_name, self, config, parameter_name)
            self._replace_module(parent, target_name, new, target)
            return
        if isinstance(target, GPartLayer) and not isinstance(target, ParamWrapper):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"'{current_key}' is already wrapped by another PEFT method ({type(target).__name__}); "
                            "GPart cannot be stacked on it.")
        _check_adaptable(target, current_key)
        wrapper = wrapper_for(target)
        if wrapper is None:
            raise TypeError(f"GPart cannot adapt '{current_key}' of type {type(target).__name__}. Supported: "
                            f"{Q.SUPPORTED}; other tensors can be adapted by name with target_parameters. Adjust "
                            "target_modules or exclude_modules.")
        self._replace_module(parent, target_name, wrapper(target, adapter_name, self, config), target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # GPart wrappers hold no tensors of their own, so swapping a module in or out is a plain setattr
        # (PEFT's default also copies `.weight`, which modules adapted through target_parameters may lack).
        setattr(parent, child_name, new_module)

    def _unwrap_empty_layers(self) -> None:
        """Put the base module back wherever no adapter is left on a wrapper."""
        # innermost first: a module with two adapted parameters holds one wrapper inside the other
        for key, layer in reversed(list(self._gpart_layers())):
            if not layer.gpart_slices:
                self.model.set_submodule(key, layer.base_layer)

    def _gpart_layers(self):
        for key, module in self.model.named_modules():
            if isinstance(module, GPartLayer):
                yield key, module

    def _adapter_layers(self, adapter_name: str):
        """The wrappers that hold `adapter_name`, in canonical order."""
        return [(key, layer) for key, layer in self._gpart_layers() if adapter_name in layer.gpart_slices]

    def current_layout(self, adapter_name: str) -> list[tuple[str, tuple[int, ...]]]:
        """The ordered [name, shape] list of the tensors `adapter_name` adapts."""
        return [(f"{_clean_name(key)}.{suffix}", shape)
                for key, layer in self._adapter_layers(adapter_name) for suffix, shape in layer.adapted_shapes()]

    def _finish_adapter(self, adapter_name: str, low_cpu_mem_usage: bool) -> None:
        """Fix the layout, check it against the config, give every wrapper its slice and create theta."""
        config: GPartConfig = self.peft_config[adapter_name]
        layout = self.current_layout(adapter_name)
        D = sum(math.prod(shape) for _, shape in layout)
        if config.layout is not None:
            _check_layout(config, layout, D)
        check_sizes(D, config.d)
        config.D, config.layout = D, [[name, list(shape)] for name, shape in layout]
        config.layout_fingerprint = layout_fingerprint(layout, config.partition_scope, config.layers_pattern)
        scope = plan(config.partition_scope, layout, config.d, config.seed, config.layers_pattern)
        if config.grouping == "signed_magnitude":
            projections = [self._signed_magnitude_groups(adapter_name, config)]
        else:
            projections = [make_projection(config.projection, block.seed, block.D, block.d, config.partition_version,
                                           config.column_gain_ratio) for block in scope.blocks]
        self._gpart_projections[adapter_name] = projections
        placements = iter(scope.placements)
        for _, layer in self._adapter_layers(adapter_name):
            slices = []
            for _, shape in layer.adapted_shapes():
                block, start = next(placements)
                slices.append(TensorSlice(projections[block], start, shape, scope.blocks[block].theta_offset))
            layer.gpart_slices[adapter_name] = (slices[0], slices[1] if len(slices) > 1 else None)
        device = torch.device("meta") if low_cpu_mem_usage else self._first_adapted_tensor(adapter_name).device
        self.gpart_theta[adapter_name] = nn.Parameter(_initial_theta(config, device))

    def _signed_magnitude_groups(self, adapter_name: str, config: GPartConfig) -> SignedMagnitudeGroups:
        """The W0-dependent groups, checked against the fingerprint a loaded config records."""
        weights = [t for _, layer in self._adapter_layers(adapter_name) for _, t in layer.adapted_tensors()]
        if any(t.is_meta or not t.dtype.is_floating_point for t in weights):
            raise ValueError("grouping='signed_magnitude' computes its groups from the base weights' values, but some "
                             "adapted weights are quantized or not loaded yet (meta). Load the base model "
                             "unquantized, without low_cpu_mem_usage, or use grouping='random'.")
        groups = SignedMagnitudeGroups(weights, config.d)
        if config.grouping_fingerprint is not None and config.grouping_fingerprint != groups.fingerprint():
            raise LayoutMismatchError("This adapter's grouping='signed_magnitude' groups were computed from other "
                                      "base weights: the signs and magnitudes of this model's W0 give different "
                                      "groups, so theta would update other weights. Load it onto the base model it "
                                      "was trained on.")
        config.grouping_fingerprint = groups.fingerprint()
        return groups

    def _first_adapted_tensor(self, adapter_name: str) -> torch.Tensor:
        return self._adapter_layers(adapter_name)[0][1].adapted_tensors()[0][1]

    def _abort_adapter(self, adapter_name: str) -> None:
        """Undo a failed injection: remove the adapter everywhere and unwrap wrappers left empty."""
        for _, layer in self._gpart_layers():
            layer.gpart_slices.pop(adapter_name, None)
            layer.gpart_dropout.pop(adapter_name, None)
        self._unwrap_empty_layers()
        # modules_to_save copies PEFT made for this adapter: a wrapper made now goes, an older one loses the copy
        for key, module in reversed(list(self.model.named_modules())):
            if isinstance(module, AuxiliaryTrainingWrapper):
                if id(module) not in self._gpart_aux_before:
                    self.model.set_submodule(key, module.original_module)
                else:
                    module.delete_adapter(adapter_name, [a for a in module.active_adapters if a != adapter_name])
        self._forget_theta(adapter_name)
        self.peft_config.pop(adapter_name, None)
        for param, flag in self._gpart_requires_grad.pop(adapter_name, []):
            param.requires_grad_(flag)

    def _forget_theta(self, adapter_name: str) -> None:
        """Drop the adapter's theta and what was derived from its config (scales, projections)."""
        if adapter_name in self.gpart_theta:
            del self.gpart_theta[adapter_name]
        self._gpart_scales = {k: v for k, v in self._gpart_scales.items() if k[0] != adapter_name}
        self._gpart_projections.pop(adapter_name, None)

    # -- theta bookkeeping -----------------------------------------------------------------------------

    def scales_for(self, adapter_name: str, device) -> torch.Tensor:
        """theta's column scales on `device` (1/sqrt(n_j) of the partition; its blocks' in turn; d floats, cached)."""
        key = (adapter_name, str(device))
        if key not in self._gpart_scales:
            scales = [p.scales() for p in self._gpart_projections[adapter_name]]
            self._gpart_scales[key] = torch.cat(scales).to(device)
        return self._gpart_scales[key]

    def _set_theta_trainability(self, inference_mode: bool = False) -> None:
        active = set(self.active_adapters)
        for name, theta in self.gpart_theta.items():
            theta.requires_grad_(name in active and not inference_mode and not self.peft_config[name].inference_mode)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_theta_trainability(inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.gpart_theta]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {sorted(self.gpart_theta)}.")
        for name in names:
            self.gpart_theta[name].requires_grad_(requires_grad)
        super().set_requires_grad(names, requires_grad)  # the adapters' modules_to_save copies

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        # theta lives on the tuner, not in the wrappers that PEFT switches: inside disable_adapter() no theta
        # trains (as LoRA's and VeRA's adapter weights do not). On exit every flag PEFT or we switched, theta's
        # and the modules_to_save copies', is put back as it was (PEFT would make a frozen adapter trainable).
        if not enabled and self._gpart_grad_while_enabled is None:
            copies = [p for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)
                      for p in m.parameters()]
            self._gpart_grad_while_enabled = [(p, p.requires_grad) for p in [*self.gpart_theta.values(), *copies]]
        super()._enable_adapter_layers(enabled)
        if not enabled:
            for theta in self.gpart_theta.values():
                theta.requires_grad_(False)
        elif self._gpart_grad_while_enabled is not None:
            for param, flag in self._gpart_grad_while_enabled:
                param.requires_grad_(flag)
            self._gpart_grad_while_enabled = None

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # theta is created in fp32; without autocast it follows (and keeps) the base weights' dtype, like
        # LoRA's factors. A quantized base has no float weight to follow: theta stays fp32 there.
        theta = self.gpart_theta[adapter_name]
        if theta.is_meta or autocast_adapter_dtype:
            return
        first = self._first_adapted_tensor(adapter_name)
        if first.dtype.is_floating_point and first.dtype != theta.dtype:
            theta.keep_dtype = first.dtype
            theta.data = theta.data.to(first.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        self._forget_theta(adapter_name)
        if was_active:  # PEFT activates what is left, trainable as set_adapter makes it
            self._set_theta_trainability()
        # unwrap layers that no adapter uses any more, so nothing of the adapter is left behind
        self._unwrap_empty_layers()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """A new adapter whose theta is sum_i weights[i] * theta_i.

        Exact in weight space because Delta_W is linear in theta, provided every adapter shares the same
        partition: same seed, d and layout fingerprint.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named '{adapter_name}' already exists; choose another name.")
        if not adapters or len(adapters) != len(weights):
            raise ValueError("add_weighted_adapter needs as many weights as adapters, and at least one adapter.")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found; available: {sorted(self.peft_config)}.")
        ref = self.peft_config[adapters[0]]
        for name in adapters[1:]:
            other = self.peft_config[name]
            for attr in ("seed", "d", "layout_fingerprint", "partition_version", "projection", "column_gain_ratio",
                         "partition_scope", "grouping_fingerprint"):
                if getattr(other, attr) != getattr(ref, attr):
                    raise ValueError(f"Cannot combine '{adapters[0]}' and '{name}' in theta space: their {attr} "
                                     f"differs ({getattr(ref, attr)!r} vs {getattr(other, attr)!r}), so their thetas "
                                     "index different partitions. Combine adapters trained with the same seed, d and "
                                     "target modules.")
        new_config = copy.deepcopy(ref)
        new_config.inference_mode = True
        self.peft_config[adapter_name] = new_config
        self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            combo = sum(w * self.gpart_theta[a].float() for a, w in zip(adapters, weights))
            theta = self.gpart_theta[adapter_name]
            theta.copy_(combo.to(theta.device, theta.dtype))

    # -- saving and loading ----------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        key = f"{THETA_KEY}.{adapter_name}"
        if key not in state_dict:
            raise KeyError(f"theta of adapter '{adapter_name}' ({key}) is not in the model's state dict.")
        theta = state_dict[key]
        if hasattr(theta, "full_tensor"):
            # FSDP2 shards theta (a DTensor); the adapter file must hold all of it. This is a collective:
            # under FSDP2 every rank calls save/state-dict functions, as Accelerate and Trainer do.
            theta = theta.full_tensor()
        return {key: theta}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        problem = _theta_problem(state_dict, config)
        if problem is not None:
            tuner = getattr(model, "base_model", model)
            if isinstance(tuner, GPartModel) and adapter_name in tuner.peft_config:
                if len(tuner.peft_config) > 1:
                    tuner.delete_adapter(adapter_name)
                else:
                    tuner._abort_adapter(adapter_name)
            raise ValueError(problem)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _initial_theta(config: GPartConfig, device) -> torch.Tensor:
    if device.type == "meta" or config.init_scale == 0.0:
        return torch.zeros(config.d, device=device)
    gen = torch.Generator().manual_seed(config.seed)
    return (torch.randn(config.d, generator=gen) * config.init_scale).to(device)


def _check_layout(config: GPartConfig, layout: list, D: int) -> None:
    """Raise LayoutMismatchError naming the first tensor that differs from the saved layout."""
    saved = [(name, tuple(shape)) for name, shape in config.layout]
    for i, (have, want) in enumerate(zip(layout, saved)):
        if have != want:
            raise LayoutMismatchError(f"This adapter does not fit the model: adapted tensor #{i} is {have[0]} "
                                      f"{list(have[1])} in the model but {want[0]} {list(want[1])} in the adapter. "
                                      "Load it onto the base model it was trained on.")
    if len(layout) != len(saved):
        i = min(len(layout), len(saved))
        where, extra = ("model", layout[i]) if len(layout) > len(saved) else ("adapter", saved[i])
        raise LayoutMismatchError(f"This adapter does not fit the model: the {where} has an extra adapted tensor "
                                  f"#{i}, {extra[0]} {list(extra[1])} ({len(layout)} tensors in the model, "
                                  f"{len(saved)} in the adapter).")
    if config.D is not None and config.D != D:
        raise LayoutMismatchError(f"The adapter was trained on D={config.D} weights but the model has D={D}.")
    scope = config.partition_scope
    if config.layout_fingerprint not in (None, layout_fingerprint(layout, scope, config.layers_pattern)):
        raise LayoutMismatchError("The adapter's layout fingerprint does not match its layout under "
                                  f"partition_scope={scope!r}: the adapter was made under another partition scope (or "
                                  "layers_pattern), which maps theta differently, or the file is corrupt. Load it "
                                  "with the adapter_config.json it was saved with.")


def _theta_problem(state_dict: dict, config: GPartConfig) -> str | None:
    """Why the loaded state dict cannot be this adapter's theta, or None when it can."""
    # the one key PEFT loads into theta: under any other name (say a bare "gpart_theta") theta would stay unset
    if THETA_KEY not in state_dict:
        return (f"The adapter file holds no theta (expected the tensor '{THETA_KEY}'; found {sorted(state_dict)[:5]}). "
                "It is not a GPart adapter, or it was truncated.")
    theta = state_dict[THETA_KEY]
    if not isinstance(theta, torch.Tensor) or not theta.dtype.is_floating_point:
        return f"theta in the adapter file has dtype {getattr(theta, 'dtype', type(theta))}; expected a float tensor."
    if tuple(theta.shape) != (config.d,):
        return (f"theta in the adapter file has shape {list(theta.shape)} but the config says d={config.d}; the "
                "file and its adapter_config.json do not belong together.")
    return None
