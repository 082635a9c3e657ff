"""emotion2vec on Triton: export, serve, classify, load-test."""
