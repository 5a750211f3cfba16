"""Data stages: prompts -> target-regenerated responses (tokens dataset) -> hidden-state features."""
