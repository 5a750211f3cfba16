"""Data stages: prompts -> target-regenerated responses (tokens dataset) -> hidden-state features."""

# Tokens per feature shard unless told otherwise. It lives here, not in `features`, because the CLI needs
# it to declare its flags, and importing this package costs nothing while `features` pulls in torch.
DEFAULT_SHARD_TOKENS = 32768
