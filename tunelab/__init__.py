"""tunelab: fine-tune pretrained language models on your own data, then evaluate and use them.

import tunelab
run = tunelab.train(model="minilm-l6", method="lora", train="train.csv", epochs=1)
tunelab.load("runs/x").predict(["a gorgeous, witty, seductive movie"])
print(tunelab.estimate(model="minilm-l6", train="train.csv", methods="lora,full").table())
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "load", "estimate", "load_config", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import tunelab` and `tunelab --help` stay fast.
    if name in ("train", "load"):
        from tunelab import run

        return getattr(run, name)
    if name == "estimate":  # the function (its module is tunelab.estimator)
        import importlib

        # by name: `run` imports this package for __version__, and a static import here would
        # read (to the layer check) as run reaching up to the estimator
        return importlib.import_module("tunelab.estimator").estimate
    if name == "load_config":
        from tunelab.config import load_config

        return load_config
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
