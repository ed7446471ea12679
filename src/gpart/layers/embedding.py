"""The wrapper of nn.Embedding: only the looked-up rows of Delta_W are drawn from theta."""

from __future__ import annotations

import torch

from .. import functional as Fn
from .base import GPartModule


class Embedding(GPartModule):
    def __init__(self, base_layer, adapter_name: str, owner, config) -> None:
        super().__init__(base_layer, adapter_name, owner, config)
        # PEFT's convention for embeddings (LoRA's too): in = the vocabulary, out = the embedding width
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def adapted_tensors(self):
        return [("weight", self.get_base_layer().weight)]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._adapters_to_apply()  # first: a disabled, merged adapter is unmerged here
        y = self.base_layer(x, *args, **kwargs)
        padding_idx = self.get_base_layer().padding_idx
        for name in adapters:
            theta = self._theta(name)
            y = Fn.RowLookup.apply(x, theta, y, self._update(name, theta), padding_idx)
        return y
