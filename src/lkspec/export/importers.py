"""Where checkpoint reading used to live; it is `lkspec.drafts.checkpoint` now.

Reading belongs below the stages that load drafts, and this package only writes, so the reader moved
down beside the drafts. The names stay importable from here so that code written against the old
location keeps working; new code imports `lkspec.drafts.checkpoint` (or `lkspec.drafts`).
"""

from lkspec.drafts.checkpoint import (
    PICKLE_SUFFIXES,
    PROVENANCE_FILE,
    Checkpoint,
    expected_names,
    read_checkpoint,
    weight_files,
)

__all__ = ["PICKLE_SUFFIXES", "PROVENANCE_FILE", "Checkpoint", "expected_names", "read_checkpoint", "weight_files"]
