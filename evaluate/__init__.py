"""Stage 3: the Recall@K retrieval protocols and their reports."""
