"""The data edge: the corpus format and its rules (corpus), the one corpus reader (reader), paths and
object storage (storage), a job's output parts (parts), chat templates and tokenisation (chat), the
hinted-decoding hint prompt and its cutting (hints), preference pairs (pairs), answer verifiers
(verify) and the task corpora (datasets). Imports nothing of opsft outside data/ (but score_columns)."""
