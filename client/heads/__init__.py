"""Custom heads: `e2v train-head` trains a classifier for your own labels on the served
model's embeddings (cached), cross-validates it, and exports it with `export.heads` as a
Triton ensemble that `e2v classify --model <model>_NAME` calls like the base model."""
