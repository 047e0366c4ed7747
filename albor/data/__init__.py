"""Data: raw corpora, the tokenizer, token shards, the ``prepare-data`` command, dataset resolution, loaders.

Imports run one way: the library modules (corpus and its readers, records,
split, shards, tokenizer, tokenizing, unit_worker, spill, parts, staging,
verify) know nothing of the command (``prepare``) or of a run (``resolve``,
``loader``). Only ``loader`` imports torch, so ``albor prepare-data`` and
``albor verify-data`` start without it.
"""
