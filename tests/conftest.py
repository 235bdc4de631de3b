"""Shared test set-up. Environment first: it must be in place before torch is imported."""

import os

# See server/__init__.py: spinning OpenMP threads starve the live server under test.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
