"""Batched argmax prediction for classifiers, outside the Trainer (final test numbers, `gpart eval`)."""
from __future__ import annotations

import torch


@torch.no_grad()
def predict_classes(model, features: list[dict], collate, batch_size: int) -> list[int]:
    """Argmax class per feature. Text is batched by length (far less padding); order is restored."""
    from transformers.utils.logging import tqdm  # off under `gpart train --quiet`

    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i].get("input_ids", ())))
    out = [0] * len(features)
    for start in tqdm(range(0, len(order), batch_size), desc="eval", leave=False,
                      disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        batch = collate([{k: v for k, v in features[i].items() if k != "labels"} for i in idx])
        device = next(model.parameters()).device
        logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            out[i] = p
    return out
