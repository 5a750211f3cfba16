"""lkspec: train speculative-decoding drafts on the acceptance rate itself (LK losses)."""

__version__ = "0.1.0"
