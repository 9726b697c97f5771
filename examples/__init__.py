"""Examples of user code (not shipped): `python examples/sasrec_time_ssd.py`; tests import `examples.*` from the repo root."""
