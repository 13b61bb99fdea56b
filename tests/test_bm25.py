"""BM25 on word tokens: rare shared words rank a document first; bad input is a clear error."""

import pytest
import torch

from influence.baselines import bm25_scores, words

DOCS = [
    "The capital of France is Paris.",
    "Zorblat the heron nests near the Quillon river.",
    "The river is long and the capital is old.",
    "Paris has a river; the river is the Seine.",
]


def test_words_lowercase_and_split_on_non_alphanumerics():
    assert words("Zorblat's heron-nest, 2024_x!") == ["zorblat", "s", "heron", "nest", "2024", "x"]


def test_document_with_the_query_rare_words_ranks_first():
    queries = ["Where does the ZORBLAT heron nest?", "the capital of France"]
    scores = bm25_scores(queries, DOCS)
    assert scores.shape == (2, 4) and scores.dtype == torch.float64
    assert scores.argmax(1).tolist() == [1, 0]
    # A query with no word of the corpus scores 0 everywhere.
    assert bm25_scores(["qwerty"], DOCS).abs().max() == 0


def test_scores_follow_rarity_and_term_frequency_not_document_order():
    # The same documents in another order give the same scores, permuted.
    perm = [2, 0, 3, 1]
    scores = bm25_scores(["river heron"], DOCS)
    permuted = bm25_scores(["river heron"], [DOCS[i] for i in perm])
    torch.testing.assert_close(permuted, scores[:, perm], rtol=1e-12, atol=0)
    assert scores[0, 1] > scores[0, 3] > scores[0, 2] > 0  # rare word; "river" twice; once


def test_empty_documents_or_a_bare_string_is_an_error():
    with pytest.raises(ValueError, match="documents is empty"):
        bm25_scores(["a query"], [])
    with pytest.raises(ValueError, match="lists of strings"):
        bm25_scores("a query", DOCS)


def test_corpus_without_words_scores_zero():
    assert torch.equal(bm25_scores(["a", "b"], ["", "?!"]), torch.zeros(2, 2, dtype=torch.float64))
