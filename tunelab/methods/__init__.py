"""Fine-tuning methods: what trains, how it is saved, loaded and merged.

Each module has `DEFAULT_LR`, `apply(model, config, task)` (marks what trains, returns the
model to train), `save(model, dir)`, `load(config, task, dir)`, and `merge(model)` returning
plain transformers weights (`merge = None` where the maths does not allow it).
`PLAIN_WEIGHTS = True` marks a method whose trained model already is plain weights (its
`merge` returns it as is), so there is no merge to check.
"""

from tunelab.methods import adapter, freeze, full, ia3, lora, prefix, prompt

METHODS = {
    "full": full,
    "freeze": freeze,
    "lora": lora,
    "adapter": adapter,
    "prefix": prefix,
    "prompt": prompt,
    "ia3": ia3,
}


def plain_weights(method: object) -> bool:
    """Whether the method's trained model already is plain weights (nothing to merge)."""
    return getattr(method, "PLAIN_WEIGHTS", False)
