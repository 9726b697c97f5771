"""Accuracy and transfer experiments on real data (not shipped, not timed): run from the repo root, e.g.
`python -m experiments.ml100k_vs_sasrec --help`."""
