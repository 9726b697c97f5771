"""CI gates and device scripts (not shipped): run from the repo root, e.g. `python -m tools.offline_sm90 --check`."""
