"""Helpers shared by the tests: small reference checkpoints (checkpoints.py)."""
