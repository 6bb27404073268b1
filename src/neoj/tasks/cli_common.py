"""What every task subcommand of `neoj` shares: the epilog and help formatter of their parsers, loading the model
their options name, and whether to show progress. Used by neoj.tasks.cli and neoj.tasks.batch_cli.
"""

from __future__ import annotations

import argparse

from ..cli_options import check_generation_options, load_from_args

TASK_EPILOG = """models: --model takes a checkpoint directory, a Hub id (EleutherAI/gpt-neo-1.3B, EleutherAI/gpt-j-6b)
or random:PRESET; without it the small built-in model is used, whose answers are weak: use a real
checkpoint for real work. Prompts: every template is in neoj/tasks/prompts.py; --prompts FILE (.json or
.toml) overrides any of them by name."""
FORMATTER = argparse.RawDescriptionHelpFormatter  # descriptions and epilogs keep their line breaks


def load_model(args):
    """Returns the model of `args`, after checking its generation options (so a typo fails before loading)."""
    check_generation_options(args)
    return load_from_args(args)


def show_progress(args) -> bool:
    """Returns whether to draw progress bars (not with --no-progress)."""
    return not getattr(args, "no_progress", False)
