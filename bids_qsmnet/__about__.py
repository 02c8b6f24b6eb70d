"""Version of bids_qsmnet (kept apart so that reading it imports nothing heavy)."""

__version__ = "0.1.0"
