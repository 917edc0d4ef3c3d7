"""Fine-tuning methods: what trains, how it is saved and loaded.

Each module has `DEFAULT_LR`, `apply(model, config, task)`, `save(model, dir)` and
`load(config, task, dir)`.
"""

from tunelab.methods import full, lora

METHODS = {"full": full, "lora": lora}
