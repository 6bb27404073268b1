"""neoj: run, serve, fine-tune and evaluate GPT-Neo and GPT-J locally, from their Hugging Face checkpoints."""

from .threads import prefer_sleeping_openmp_threads

prefer_sleeping_openmp_threads()  # before anything imports torch: see neoj/threads.py

from .api import LanguageModel, from_config, load
from .config import PRESETS, ModelConfig, load_config, preset
from .constraint import Constraint, ConstraintError
from .errors import CheckpointError, ConfigError, ContextLengthError, GenerationError, NeojError
from .engine import PrefixCache, Speculative
from .generate import Completion, Score
from .sampling import GenerationParams
from .tokenizer import Tokenizer
from . import tasks  # neoj.tasks.summarize(lm, text), ask, translate, classify, complete_code, ChatSession, run_batch

__version__ = "0.1.0"

__all__ = [
    "Constraint", "ConstraintError", "PrefixCache", "Speculative",
    "load", "from_config", "LanguageModel", "ModelConfig", "PRESETS", "preset", "load_config", "Tokenizer",
    "GenerationParams", "Completion", "Score", "NeojError", "ConfigError", "CheckpointError",
    "ContextLengthError", "GenerationError", "tasks",
]
