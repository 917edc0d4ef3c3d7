"""An ONNX export loaded for use: ONNX Runtime runs the graph and the run's own task turns
texts into inputs and logits into predictions and metrics, so an ONNX model answers and scores
the way `tunelab.run.Run` does. `tunelab export --onnx` checks its files with it; `tunelab
serve` serves an ONNX export folder with it.

An ONNX export folder holds:

    model.onnx            float32 graph (inputs input_ids, attention_mask[, token_type_ids]; output logits)
    model_quantized.onnx  the int8 graph (`--int8`; Optimum's file name for a quantized model)
    tunelab_config.yaml   the run's config: task, labels, lengths, thresholds
    config.json, tokenizer files, export.json (the check), README.md (the model card)

onnxruntime is an optional dependency (the `onnx` extra): it is imported where a session opens.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tunelab.config import Config, load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import load_tokenizer
from tunelab.tasks import TASKS

ONNX_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
RUN_CONFIG = "tunelab_config.yaml"
INSTALL_HINT = "ONNX export and serving need onnx and onnxruntime: pip install 'tunelab[onnx]'"


def onnxruntime() -> Any:
    """The onnxruntime module, or a one-line install hint."""
    try:
        import onnxruntime  # optional: the `onnx` extra
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnxruntime


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a graph, with all graph optimisations and as many
    threads as torch uses (so timings next to PyTorch compare like with like)."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    # no busy-waiting between calls: spinning threads starve whatever else runs on the machine
    # (on 2 cores they made the PyTorch model timed beside them 100x slower)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class SessionModel(torch.nn.Module):
    """An ONNX Runtime session called like a transformers model (`model(**batch).logits`), so
    the task's own `outputs` (length-sorted batches, padding, token alignment) run it unchanged.
    Inputs the graph takes but the batch lacks (segment ids for one text) are zeros, which is
    what the PyTorch model assumes when they are not given."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def forward(self, **batch: torch.Tensor) -> Any:
        ids = batch["input_ids"]
        feed = {
            name: batch.get(name, torch.zeros_like(ids)).numpy().astype(np.int64) for name in self.input_names
        }
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


class OnnxRun:
    """An ONNX export loaded for prediction: the part of `tunelab.run.Run` that `tunelab serve`
    uses (`path`, `config`, `task`, `tokenizer`, `predict`), run by ONNX Runtime."""

    def __init__(
        self, path: Path, config: Config, task: Any, tokenizer: Any, session: Any, file: str
    ) -> None:
        self.path, self.config, self.task, self.tokenizer, self.file = path, config, task, tokenizer, file
        self.model = SessionModel(session)
        self.device = torch.device("cpu")

    def logits(self, examples: list[dict[str, Any]]) -> list[Any]:
        """The task's outputs for encoded examples (what `task.metrics` and `task.predictions` read)."""
        return self.task.outputs(self.model, examples, self.tokenizer.pad_token_id,
                                 self.config.train.eval_batch_size, self.device, None)  # fmt: skip

    def predict(self, texts: str | list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """The task's prediction for each text, as `Run.predict` gives it."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        examples = self.task.encode_inputs(texts, self.tokenizer, pairs)
        return self.task.predictions(self.logits(examples), examples)

    def generate(self, prompts: list[str], streamer: Any = None, max_new_tokens: int | None = None,
                 options: Any = None, stop: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
        """ONNX exports are encoders: nothing to generate (the server's routes never ask)."""
        raise TunelabError(f"{self.path} is an ONNX {self.config.task} model; it does not generate text")


def is_onnx_export(path: str | Path) -> bool:
    """Whether a folder is an ONNX export written by `tunelab export --onnx`."""
    return (Path(path) / RUN_CONFIG).is_file() and (Path(path) / ONNX_FILE).is_file()


def load_onnx(path: str | Path, file: str | None = None, threads: int | None = None) -> OnnxRun:
    """Load an ONNX export folder: `file` names the graph (default: the int8 one where the
    export has it, else model.onnx).

    Raises:
        TunelabError: the folder is not an ONNX export, or the file is not in it.
        ConfigError: onnxruntime is not installed.
    """
    path = Path(path)
    if not is_onnx_export(path):
        raise TunelabError(f"{path} is not an ONNX export: it needs {ONNX_FILE} and {RUN_CONFIG}")
    file = file or (INT8_FILE if (path / INT8_FILE).is_file() else ONNX_FILE)
    if not (path / file).is_file():
        raise TunelabError(f"{path / file} not found; the export holds {ONNX_FILE}")
    # the graph runs in float32 whatever precision the run trained in (its config may name fp16/bf16)
    config = load_config(path / RUN_CONFIG, ["train.precision=fp32"])
    task = TASKS[config.task](config)
    return OnnxRun(path, config, task, load_tokenizer(str(path)), open_session(path / file, threads), file)
