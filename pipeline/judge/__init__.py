"""Judging a model (evaluate): attacks, corruptions, metrics, the evaluate protocol and its cache, the figures, and
the registry's champion rule. Train and advtrain judge each epoch with the same metrics and attacks."""
