"""Tasks: how rows become model inputs, which loss and metrics apply, and how outputs read.

Each task is one module with the same small contract (see `classification.py`):
`load_splits`, `read`, `encode`, `encode_inputs`, `build_model`, `collate`, `units`, `loss`,
`metrics`, `calibrate`, `predictions` (and from `base.Task`: `outputs`, `probe_batch`), and the
attributes `name`, `default_metric`, `head_modules`, `peft_task_type` and `generative`.
The generative tasks (`causal_lm.py`, `seq2seq.py`) share `generative.py`.
"""

from collections.abc import Callable

from tunelab.tasks.base import Task
from tunelab.tasks.causal_lm import CausalLMTask
from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.masked_lm import MaskedLMTask
from tunelab.tasks.preference import PreferenceTask
from tunelab.tasks.question_answering import QuestionAnsweringTask
from tunelab.tasks.regression import RegressionTask
from tunelab.tasks.seq2seq import Seq2SeqTask
from tunelab.tasks.token_classification import TokenClassificationTask

TASKS: dict[str, Callable[..., Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "token-classification": TokenClassificationTask,
    "causal-lm": CausalLMTask,
    "seq2seq": Seq2SeqTask,
    "masked-lm": MaskedLMTask,
    "question-answering": QuestionAnsweringTask,
    "preference": PreferenceTask,
}
