"""Tasks: how rows become model inputs, which loss and metrics apply, and how outputs read.

Each task is one module with the same small contract (see `classification.py`):
`load_splits`, `read`, `encode`, `encode_inputs`, `build_model`, `collate`, `units`, `loss`,
`metrics`, `calibrate`, `predictions`, and the attributes `name`, `default_metric`,
`head_modules` and `peft_task_type`.
"""

from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.regression import RegressionTask
from tunelab.tasks.token_classification import TokenClassificationTask

TASKS = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "token-classification": TokenClassificationTask,
}
