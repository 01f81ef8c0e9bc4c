"""Training infrastructure used by the recipe (``recipes/train_icl.py``): checkpoints and resume
(:mod:`.checkpoint`)."""
