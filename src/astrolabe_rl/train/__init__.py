"""Training infrastructure: the recipe, checkpoints, logging and distributed helpers."""
