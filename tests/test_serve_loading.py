"""load_served: a run directory, or a plain Hugging Face folder whose task is read from its
architecture; an exported folder answers as the run it came from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")  # the optional `serve` extra: without it these tests skip

from fastapi.testclient import TestClient

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.serve import create_app, load_served
from tunelab.serve.loading import task_of

from .test_serve import trained_classifier


def test_an_exported_folder_serves_the_same_answers(tmp_path_factory, tiny_bert, sentiment_files, tmp_path):
    classifier_run = trained_classifier(tmp_path_factory, tiny_bert, sentiment_files)
    exported = tmp_path / "merged"
    assert main(["export", str(classifier_run), "--merge", "--out", str(exported)]) == 0
    folder = load_served(exported)
    assert folder.config.task == "classification" and folder.config.method == "full"
    texts = ["so good", "so awful", "the plot was dull"]
    with (
        TestClient(create_app(folder)) as server,
        TestClient(create_app(load_served(classifier_run))) as classifier,
    ):
        a = server.post("/v1/classify", json={"input": texts}).json()["data"]
        b = classifier.post("/v1/classify", json={"input": texts}).json()["data"]
        assert server.get("/v1/models").json()["data"][0]["id"] == "merged"
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=1e-4)


def test_a_folder_with_neither_config_is_refused(tmp_path):
    with pytest.raises(
        TunelabError, match="neither a tunelab run .config.yaml. nor a Hugging Face model folder"
    ):
        load_served(tmp_path)


@pytest.mark.parametrize(
    "architecture, extra, task",
    [
        ("BertForTokenClassification", {}, "token-classification"),
        ("BertForSequenceClassification", {"problem_type": "single_label_classification"}, "classification"),
        ("BertForSequenceClassification", {"problem_type": "regression"}, "regression"),
        ("T5ForConditionalGeneration", {"is_encoder_decoder": True}, "seq2seq"),
        ("LlamaForCausalLM", {}, "causal-lm"),
    ],
)
def test_the_task_of_a_folder_comes_from_its_architecture(tmp_path, architecture, extra, task):
    assert task_of(SimpleNamespace(architectures=[architecture], **extra), tmp_path) == task


def test_an_architecture_without_a_task_is_refused(tmp_path):
    with pytest.raises(TunelabError, match="cannot tell the task from the architecture BertModel"):
        task_of(SimpleNamespace(architectures=["BertModel"]), tmp_path)
    with pytest.raises(TunelabError, match=r"architecture \(none\)"):
        task_of(SimpleNamespace(architectures=None), tmp_path)
