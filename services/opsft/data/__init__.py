"""The data edge: the corpus format and its rules (corpus), chat templates and tokenisation
(chat), preference pairs (pairs), answer verifiers (verify) and the task corpora (datasets)."""
