"""Tasks: how rows become model inputs, which loss and metrics apply, and how outputs read.

Each task is one module with the same small contract (see `classification.py`):
`load_splits`, `encode_inputs`, `build_model`, `collate`, `loss`, `metrics`, `predictions`.
"""

from tunelab.tasks.classification import ClassificationTask

TASKS = {"classification": ClassificationTask}
