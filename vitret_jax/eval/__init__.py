"""Embedding extraction, k-NN search, retrieval metrics, evaluators."""
