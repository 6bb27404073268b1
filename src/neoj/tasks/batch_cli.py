"""The `neoj batch` subcommand: bulk generation from a JSONL file, resumable, on one process or many under
torchrun (each rank its own part file, rank 0 merging), and `neoj batch --merge`, which merges part files without
loading a model. neoj.tasks.cli registers it with the other task commands; the work is neoj.tasks.batch's.
"""

from __future__ import annotations

import sys

from ..checks import prepare_output_file
from ..cli_options import STOP_HELP, add_task_args, check_generation_options, stop_text, task_sampling_options
from ..errors import NeojError
from .cli_common import FORMATTER, TASK_EPILOG, load_model, show_progress


def cmd_batch(args) -> int:
    """neoj batch: generates the output's missing records (or merges part files, with --merge); returns the exit
    status (130 when interrupted)."""
    from ..distributed import join_processes, torchrun_world
    from .batch import ReportedByRankZero, batch_layout, run_batch, uses_parts

    if args.merge:
        return _merge_batch(args)
    if args.allow_partial:
        raise NeojError("--allow-partial only goes with --merge: neoj batch --merge --allow-partial -i ... -o ...")
    # Options and the output first: a typo fails at once, blames the option, and creates no file.
    check_generation_options(args)
    if args.batch_size < 1:
        raise NeojError(f"--batch-size must be at least 1 (got {args.batch_size})")
    world = torchrun_world()
    if not uses_parts(args.output, world):
        prepare_output_file(args.output)
    processes = None
    if world > 1:  # data parallelism: every rank loads the whole model on its own device
        processes = join_processes(args.device)
        if not args.device_map:
            args.device = str(processes.device)
    options = task_sampling_options(args)
    if args.stop:
        options["stop"] = args.stop
    try:
        result = run_batch(lambda: load_model(args), args.input, args.output, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_return_sequences,
                           progress=show_progress(args), processes=processes, **options)
    except ReportedByRankZero:  # rank 0 prints it: one line, not one per process
        return 1
    if processes is not None and not processes.main:  # rank 0 reports for all
        return 130 if result.interrupted else 0
    done = result.skipped + result.written
    if result.interrupted:
        where = result.output if result.processes == 1 and not uses_parts(args.output) else \
            f"the part files in {batch_layout(args.output).parts}"
        print(f"neoj: interrupted after {done} of {result.total} records ({result.written} written by this run) "
              f"in {where}. Run the same command again to do the rest.", file=sys.stderr)
        return 130
    if uses_parts(args.output, world) or result.processes > 1:
        print(f"{result.written} records written by {result.processes} process"
              f"{'es' if result.processes > 1 else ''} ({result.skipped} already there); {result.output} holds all "
              f"{result.total}", file=sys.stderr)
        return 0
    print(f"{result.written} records written to {result.output} ({result.skipped} already there, "
          f"{result.total} in the input)", file=sys.stderr)
    return 0


def _merge_batch(args) -> int:
    """neoj batch --merge: writes the output from the part files, loading no model."""
    import os

    from .batch import merge_batch

    if os.environ.get("RANK", "0") != "0":  # under torchrun, one rank merges
        return 0
    result = merge_batch(args.input, args.output, allow_partial=args.allow_partial)
    if not result.written:
        print(f"nothing to merge: no part files; {result.output} holds {result.merged} of {result.total} records",
              file=sys.stderr)
        return 0
    notes = [f"{result.duplicates} duplicate records dropped ({result.conflicts} with different text: the first "
             "kept)"] if result.duplicates else []
    if result.missing:
        notes.append(f"{result.missing} not generated yet: the part files are kept; run the batch again to finish")
    print(f"{result.merged} of {result.total} records from {result.parts} part files written to {result.output}"
          + "".join(f"; {note}" for note in notes), file=sys.stderr)
    return 0


BATCH_EPILOG = """several processes: under torchrun each process (rank) loads the whole model on its own device and
generates every WORLD_SIZE-th record of those not done yet into its own part file; rank 0 waits for the
others and merges the parts into one output, in input order. With --seed the output does not depend on
the number of processes. Killed (any rank, even SIGKILL) and run again, with the same or another number of
processes, it completes the rest. With several machines, -o must be on a file system they all share.

  torchrun --nproc-per-node 4 -m neoj batch -i prompts.jsonl -o out.jsonl --seed 1
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m neoj batch -i prompts.jsonl -o /shared/out/

files: -o out.jsonl writes out.jsonl (one process: directly; several: from part files in out.jsonl.parts/,
removed once merged). -o DIR/ (an existing directory, or a name ending in /) writes DIR/output.jsonl from
part files DIR/part-00000.jsonl, ... on any number of processes. An existing output is only replaced when
all its lines are records of this input; they are kept. neoj batch --merge -i ... -o ... merges the part
files present without loading a model (it refuses while records are missing, unless --allow-partial).

"""


def add_batch_command(sub) -> None:
    """Registers `neoj batch` on the subcommand parser."""
    parser = sub.add_parser("batch", help="bulk generation from a JSONL file, resumable, on one or many processes",
                            description="Generate a completion for every record of --input (JSONL: \"prompt\", "
                            "optional \"id\" and per-record options) into --output (JSONL, one line per record). "
                            "Killed at any point and run again, it skips the records already written and never "
                            "duplicates or loses one. Run it with torchrun to split the records over processes "
                            "and machines.", epilog=BATCH_EPILOG + TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("--input", "-i", required=True, help="JSONL prompts file")
    parser.add_argument("--output", "-o", required=True,
                        help="JSONL output file (appended to; resumed if it exists), or a directory DIR/ for "
                        "DIR/output.jsonl and its part files (see below)")
    parser.add_argument("--batch-size", "-b", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--num-return-sequences", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", type=stop_text, help=STOP_HELP)
    parser.add_argument("--merge", action="store_true",
                        help="only merge the part files of an unfinished multi-process run into the output")
    parser.add_argument("--allow-partial", action="store_true",
                        help="with --merge: write the records there are even if some are missing")
    add_task_args(parser, 128, temperature=0.8)
    parser.set_defaults(func=cmd_batch)
