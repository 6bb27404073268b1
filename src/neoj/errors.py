"""The exceptions neoj raises: each message names the bad input and what to do about it."""


class NeojError(Exception):
    """Base class for every error neoj reports to a user."""


class ConfigError(NeojError, ValueError):
    """A config.json or preset that neoj cannot run."""


class CheckpointError(NeojError):
    """Weights that are missing, mis-shaped, truncated or unsafe to load."""


class ContextLengthError(NeojError, ValueError):
    """A prompt plus the requested new tokens does not fit in the model's context."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class GenerationError(NeojError, ValueError):
    """Generation parameters out of range, or a numerically broken model output."""
