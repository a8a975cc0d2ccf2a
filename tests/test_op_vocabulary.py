"""QEfficient's op vocabulary, the ops the paged ops' bodies may use, is the corpus's: derived
again from the exports, the checked-in list is unchanged (``scripts/op_vocabulary.py``)."""

from __future__ import annotations

from conftest import FIXTURES, fixture_model

from paged_rewrite.custom_ops.vocabulary import VOCABULARY_FILE, corpus_models, derive, op_vocabulary, parse


def test_the_checked_in_vocabulary_is_the_corpus_s() -> None:
    fixture_model("llama_default")  # fails or skips without the corpus
    assert derive(corpus_models(FIXTURES)) == VOCABULARY_FILE.read_text()


def test_the_vocabulary_lists_what_the_exports_use_and_nothing_else() -> None:
    vocabulary = op_vocabulary()
    assert len(parse(VOCABULARY_FILE.read_text())) == len(vocabulary)  # no duplicates
    assert {("ai.onnx", "ScatterND"), ("ai.onnx", "Gather"), ("ai.onnx", "Where")} <= vocabulary
    assert ("com.qualcomm.cloud", "CtxScatter") in vocabulary
    # Used by the first paged ops, by no QEfficient export:
    assert ("ai.onnx", "GatherElements") not in vocabulary
    assert ("ai.onnx", "GreaterOrEqual") not in vocabulary
