"""Data for pre-training: where the text comes from and how it becomes batches.

    loader.py    documents -> token stream -> fixed-length rows -> a deterministic, resumable loader
    stories.py   the built-in corpus: stories from a probabilistic grammar whose entropy is known
    curation/    Llama 3's data pipeline (added with the curation issue)

The loader's names are re-exported here, so `from llama3np import data; data.read_documents(...)` works.
"""
from . import stories
from .loader import (DOC_SEPARATOR, TEXT_SUFFIXES, DataLoader, document_ids, eval_batches, get_rows, n_rows,
                     read_documents, save_arrays_atomic, tokenize_documents, train_bpe, train_val_split)

__all__ = ["DOC_SEPARATOR", "TEXT_SUFFIXES", "DataLoader", "document_ids", "eval_batches", "get_rows", "n_rows",
           "read_documents", "save_arrays_atomic", "tokenize_documents", "train_bpe", "train_val_split",
           "stories"]
