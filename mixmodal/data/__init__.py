"""Data: the built-in `shapes` world, readers for real data, the training pipeline."""
