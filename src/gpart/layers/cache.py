"""The eval-mode cache: in eval mode without autograd a wrapper keeps what its forward builds from theta (the
merged weight in fp32, Delta_W in half precision, W0 + Delta_W for a parameter), so generation with an
unmerged adapter costs about what the merged model costs (docs/llm.md).

An entry is keyed by the adapter's slices and, for every tensor it was built from, the storage (held weakly,
so that the address of a freed storage cannot pass for it), offset, version counter, dtype, device, shape
and strides: an optimizer step, copy_ or load_state_dict bumps a version, .to() or `.data =` swaps a
storage, and the entry is rebuilt. Edits through `.data` bypass the version counter; call
clear_gpart_cache() after those.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

# Environment switch of the eval-mode cache: 0/off turns it off, 1/on forces it on (also in distributed runs).
EVAL_CACHE_ENV = "GPART_EVAL_CACHE"
_OFF, _ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


def eval_cache_enabled(owner) -> bool:
    """Whether wrappers owned by `owner` may keep what their eval-mode forward builds: the tuner's `eval_cache`
    (True/False), else GPART_EVAL_CACHE, else on except in a distributed run (FSDP2 and ZeRO-3 gather each
    weight for one forward only; keeping whole weights would undo their sharding)."""
    setting = getattr(owner, "eval_cache", None)
    if setting is not None:
        return bool(setting)
    env = os.environ.get(EVAL_CACHE_ENV, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    if env:
        raise ValueError(f"{EVAL_CACHE_ENV}={env!r} is not understood; set it to 0 (off) or 1 (on), or unset it.")
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _tensor_key(t: torch.Tensor | None):
    """What identifies a tensor's current contents (two weak references are equal only while they point to
    the same live storage). Raises RuntimeError for an inference tensor, which has no version counter."""
    if t is None:
        return None
    return weakref.ref(t.untyped_storage()), t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride()


def _stamp(t: torch.Tensor | None):
    """The object, version and address of a tensor: what the shortcut compares (two stamps are equal only
    for the same object, held alive by the first)."""
    return None if t is None else (id(t), t._version, t.data_ptr(), t)


def _offloaded(module: nn.Module) -> bool:
    """An accelerate hook moves this layer's weights in for each forward and out again: keeping whole
    weights would undo the offloading."""
    hook = module.__dict__.get("_hf_hook")
    return hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))


class EvalCache(dict):
    """(adapter, tag) -> (key, value) for one wrapper. A copy or a pickle starts empty: the keys hold weak
    references (which cannot be pickled), and a deep copy should not double the kept memory.

    `hot` shortcuts the commonest step (generation's decoding step), one adapter merged into an fp32
    product: a few attribute reads instead of the whole key. Whatever frees the cache frees it too; a
    changed tensor fails its check, and so does the tuner's eval_cache set to False.
    """

    hot = None

    def __reduce__(self):
        return (EvalCache, ())

    def clear(self) -> None:
        self.hot = None
        super().clear()

    def remember(self, layer, adapter_name: str, x: torch.Tensor, operands) -> None:
        """Make (w, b) the shortcut for steps like this one (x's dtype; theta, weight and bias unchanged)."""
        thetas, params = layer.gpart_owner.gpart_theta._parameters, layer.get_base_layer()._parameters
        try:
            stamps = tuple(map(_stamp, (thetas[adapter_name], params["weight"], params.get("bias"))))
        except RuntimeError:  # an inference tensor has no version counter: no shortcut
            return
        self.hot = (x.dtype, adapter_name, thetas, params, stamps, operands)

    def shortcut(self, layer, x: torch.Tensor):
        """The kept (w, b) when this step is like the remembered one, else None."""
        hot = self.hot
        if hot is None or layer.training or torch.is_grad_enabled() or x.dtype is not hot[0]:
            return None
        _, name, thetas, params, stamps, operands = hot
        if stamps != (_stamp(thetas.get(name)), _stamp(params.get("weight")), _stamp(params.get("bias"))):
            return None
        if layer.gpart_owner.eval_cache is False or torch.compiler.is_compiling():
            return None
        return operands

    def usable(self, layer, base: nn.Module, *tensors: torch.Tensor | None) -> bool:
        """Whether this forward may reuse (and fill) the cache: eval mode, no tensor that autograd must
        track, not while torch.compile traces, no offloading, and the switch on. Training mode frees it."""
        if layer.training:
            self.clear()
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return False
        return not torch.compiler.is_compiling() and eval_cache_enabled(layer.gpart_owner) and not _offloaded(base)

    def get_or_build(self, layer, adapter_name: str, tag, build, *key_tensors: torch.Tensor | None):
        """build()'s value, kept and reused while the adapter's slices and the key tensors are unchanged.
        A stale value is dropped before the new one is built, so a rebuild never holds two."""
        slot = (adapter_name, tag)
        try:
            key = (layer.gpart_slices.get(adapter_name), *map(_tensor_key, key_tensors))
        except RuntimeError:  # an inference tensor: nothing to key on, so build every time
            return build()
        entry = self.get(slot)
        if entry is not None:
            if entry[0] == key:
                return entry[1]
            self.hot = None
            del self[slot], entry
        value = build()
        self[slot] = (key, value)
        object.__setattr__(layer.gpart_owner, "gpart_cache_used", True)
        return value

    def drop_adapter(self, adapter_name: str | None = None) -> None:
        """Free what is kept for one adapter (None: for all)."""
        self.hot = None
        for slot in [s for s in self if adapter_name is None or s[0] == adapter_name]:
            del self[slot]


def clear_gpart_cache(module: nn.Module) -> None:
    """Free what every GPart wrapper inside `module` keeps for eval mode (a PeftModel, the tuner, any part)."""
    for m in module.modules():
        cache = m.__dict__.get("_gpart_cache")
        if isinstance(cache, EvalCache):
            cache.clear()
