"""Bulk generation, JSONL in and JSONL out, that never loses or repeats a record however often it is killed.

Input: one JSON object per line with a "prompt", and optionally an "id" (then every record needs a
unique one) and per-record options (max_new_tokens, temperature, top_p, top_k, repetition_penalty,
stop, seed); other fields are copied to the output. Without ids, records are keyed by line number.
Output: one line per record, {"id" (or "line"), ..., "prompt", "text" (or "texts" for several
sequences), "finish_reason", "completion_tokens"}, in input order within each batch; a prompt too long
for the context gets {"id", ..., "error"} instead (delete those lines to retry them after a fix).

Records are generated batch_size at a time, each with its own options and seed (see run_batch).
Each record is one write() of one whole line to a file opened for appending, and every batch is
fsync'd. A run killed at any point (SIGKILL included) leaves complete lines plus at most one partial
line at the end; the next run cuts that partial line off, skips every key already written, and goes on.
Ctrl-C stops a run between records and returns what it did (BatchResult.interrupted).

Several processes (torchrun, or `processes=` given) split the records, each with its own full copy of the
model (data parallelism), and write part files that rank 0 merges into the output; -o out.jsonl puts them in
out.jsonl.parts/, -o out/ beside out/output.jsonl. neoj.tasks.batch_parts holds their layout, how a run
resumes on any number of ranks, and the merge (merge_batch: `neoj batch --merge`). One process writes the
output directly unless -o is a directory or a parts directory is left to resume.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..distributed import Processes
from ..errors import ContextLengthError
from ..model_utils import fit_prompt
from ..sampling import GenerationParams
from .batch_parts import (BatchLayout, MergeResult, ReportedByRankZero, batch_layout, merge_batch, merge_parts,
                          output_record, plan_parts, read_inputs, record_key, uses_parts, wait_for_parts)
from .runner import EngineRunner, Runner, TaskError, as_runner, task_params

if TYPE_CHECKING:
    from ..engine import Engine

# The names from batch_parts stay importable from here: neoj.tasks and `neoj batch` take them from this module.
__all__ = ["BatchResult", "run_batch", "read_done", "RECORD_OPTIONS", "OUTPUT_FIELDS", "BatchLayout", "MergeResult",
           "ReportedByRankZero", "batch_layout", "merge_batch", "read_inputs", "uses_parts"]

log = logging.getLogger(__name__)

RECORD_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")
OUTPUT_FIELDS = ("text", "texts", "finish_reason", "completion_tokens", "error")


@dataclass
class BatchResult:
    """What a run did: records in the input, already done before it, written by it, and whether Ctrl-C stopped it."""

    total: int
    skipped: int
    written: int
    output: Path
    interrupted: bool = False
    processes: int = 1  # ranks that shared the run; written counts all of theirs on rank 0, its own on the others


def read_done(path: str | Path, key_field: str) -> set[str]:
    """Returns the keys already in an output file, after cutting off a partial last line left by a kill."""
    path = Path(path)
    if not path.exists():
        return set()
    try:
        with open(path, "r+b") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("%s: dropping a partial last record (%d bytes) left by an interrupted run", path,
                            len(data) - end)
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise TaskError(f"cannot resume output {path}: {exc.strerror or exc}") from None
    done = set()
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        rec = output_record(path, n, line)
        if key_field not in rec:
            raise TaskError(f"{path}:{n}: the record has no {key_field!r}; was this output written for another "
                            "input? Write to a new output file")
        done.add(record_key(rec[key_field]))
    return done


def _write_line(fd: int, record: dict) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    while data:  # O_APPEND: each write lands at the end; a short write is finished before the next record
        data = data[os.write(fd, data) :]


def run_batch(lm, input_path: str | Path, output_path: str | Path, *, batch_size: int = 8, max_new_tokens: int = 128,
              num_return_sequences: int = 1, progress: bool = False, processes: Processes | None = None,
              **options) -> BatchResult:
    """Generates a completion for every record of input_path not yet in output_path; returns what it did.

    Safe to re-run after any interruption (see the module docstring). options are generation defaults
    (temperature, top_p, stop, seed, ...); a record's own option fields override them. With a seed,
    record i (0-based, in the input) samples with seed + i unless it names its own: a resumed run
    reproduces what an uninterrupted one would have written. A LanguageModel runs on an engine of its
    own here, so records with different options and lengths still share every decode step. lm may also be
    a function returning one: it is called only when there is something to generate (after the ranks have
    split the work, so their different loading times never keep a collective waiting).
    `processes` (neoj.distributed.join_processes) splits the records over torchrun's ranks, each writing a
    part file that rank 0 merges; an output directory uses part files on one process too (neoj.tasks.batch_parts).
    Bad defaults, input or output raise TaskError before the output file is created; Ctrl-C (KeyboardInterrupt)
    stops between records and returns with interrupted=True, every record written so far kept.
    """
    defaults = _checked_defaults(batch_size, dict(options, max_new_tokens=max_new_tokens,
                                                  num_return_sequences=num_return_sequences))
    processes = processes or Processes()
    if uses_parts(output_path, processes.world):
        return _run_parts(lm, input_path, batch_layout(output_path), processes, defaults, batch_size, progress)
    key_field, records = read_inputs(input_path)
    output_path = Path(output_path)
    if output_path.resolve() == Path(input_path).resolve():
        raise TaskError("the output file must not be the input file")
    done = read_done(output_path, key_field)
    pending = [(i, k, r) for i, (k, r) in enumerate(records) if record_key(k) not in done]
    skipped = len(records) - len(pending)
    written, interrupted = _append_records(lm, output_path, key_field, pending, defaults, batch_size,
                                           _bar(progress, len(records), skipped, "batch"))
    return BatchResult(len(records), skipped, written, output_path, interrupted)


def _bar(progress: bool, total: int, initial: int, desc: str):
    """Returns a function making the progress bar (or None), called once the output is open."""
    if not progress:
        return lambda: None

    def make():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="record", desc=desc, dynamic_ncols=True)

    return make


def _append_records(lm, path: Path, key_field: str, pending: list, defaults: dict, batch_size: int,
                    make_bar) -> tuple[int, bool]:
    """Generates the pending (index, key, record)s, appending one line each to path; returns (written, interrupted).

    The file is opened before the model is loaded or the engine started, so a bad path fails first."""
    try:  # before the engine and the progress bar: an error here is printed on a line of its own
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TaskError(f"cannot write output {path}: {exc.strerror or exc}") from None
    engine = bar = None
    written = 0
    interrupted = False
    try:
        if pending:
            runner, engine = _engine_runner(lm, batch_size)
            bar = make_bar()
        for b in range(0, len(pending), batch_size):
            batch = pending[b : b + batch_size]
            for (_, key, rec), result in zip(batch, _generate(runner, defaults, batch)):
                _write_line(fd, _output(key_field, key, rec, result))
                written += 1
            os.fsync(fd)
            if bar is not None:
                bar.update(len(batch))
    except KeyboardInterrupt:  # the records of the batch being generated are not written; the rest are
        interrupted = True
    finally:
        os.close(fd)
        if engine is not None:
            engine.shutdown()
        if bar is not None:
            bar.close()
    return written, interrupted


def _run_parts(lm, input_path, layout: BatchLayout, processes: Processes, defaults: dict, batch_size: int,
               progress: bool) -> BatchResult:
    """Generates this rank's share of what is left into its part file; rank 0 then waits for all and merges."""
    plan = plan_parts(input_path, layout, processes)
    share = plan.pending[processes.rank :: processes.world]
    part = layout.part(processes.rank)
    read_done(part, plan.key_field)  # cuts a partial last line of this rank's own file (it alone appends there)
    mine = [(i, *plan.records[i]) for i in share]
    desc = "batch" if processes.world == 1 else f"batch (rank 0 of {processes.world})"
    written, interrupted = _append_records(lm, part, plan.key_field, mine, defaults, batch_size,
                                           _bar(progress and processes.main, len(mine), 0, desc))
    total = len(plan.records)
    if not interrupted:
        try:  # every rank waits, so the job ends as one (torchrun's agents on other machines wait for it too)
            wait_for_parts(layout, plan, stop_early=not processes.main)
            if processes.main:
                merge_parts(input_path, layout, plan.key_field, plan.records, allow_partial=False)
        except KeyboardInterrupt:
            interrupted = True
    if not processes.main:
        return BatchResult(total, plan.skipped, written, part, interrupted, processes.world)
    done = total if not interrupted else plan.skipped + written
    return BatchResult(total, plan.skipped, done - plan.skipped, layout.output, interrupted, processes.world)


def _checked_defaults(batch_size: int, defaults: dict) -> dict:
    """Returns the run's default options, or raises TaskError for a bad one (before any file is touched)."""
    if batch_size < 1:
        raise TaskError(f"batch_size={batch_size} must be at least 1")
    try:
        check = dict(defaults)
        task_params(check.pop("max_new_tokens"), check.pop("stop", None) or (), **check)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"bad generation options: {exc}") from None
    return defaults


def _engine_runner(lm, batch_size: int) -> tuple[Runner, "Engine | None"]:
    """Returns (runner, engine to shut down or None): a Runner given is used as it is, a LanguageModel gets an
    engine of its own, with the model's prefix cache and speculation (lm.prefix_cache, lm.speculative)."""
    if isinstance(lm, Runner):
        return lm, None
    if callable(lm) and not hasattr(lm, "model"):  # a function returning the model: load it now
        return _engine_runner(lm(), batch_size)
    from ..engine import Engine

    runner = as_runner(lm)
    lm = runner.lm
    engine = Engine(lm.model, runner.tokenizer, max_batch=batch_size, max_queue=batch_size,
                    prefix_cache=lm.prefix_cache, speculative=lm.speculative)
    return EngineRunner(runner.lm, engine), engine


def _record_params(defaults: dict, index: int, key, rec: dict) -> GenerationParams:
    """Returns a record's generation parameters: the defaults, its own option fields, and seed + index."""
    opts = {**defaults, **{k: rec[k] for k in RECORD_OPTIONS if k in rec}}
    if opts.get("seed") is not None and "seed" not in rec:
        opts["seed"] += index
    try:
        return task_params(opts.pop("max_new_tokens"), opts.pop("stop", None) or (), **opts)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"record {key!r}: bad generation options: {exc}") from None


def _generate(runner: Runner, defaults: dict, batch: list[tuple[int, object, dict]]) -> list[list | str]:
    """Returns per (index, key, record) its Completions, or why its prompt cannot fit the context."""
    results: list[list | str] = [""] * len(batch)
    jobs, job_rows = [], []
    for j, (index, key, rec) in enumerate(batch):
        params = _record_params(defaults, index, key, rec)
        try:
            ids = fit_prompt(runner.tokenizer.encode(rec["prompt"]), params.max_new_tokens, runner.n_positions,
                             params.truncate)
        except ContextLengthError as exc:
            results[j] = str(exc)
            continue
        jobs.append((ids, params))
        job_rows.append(j)
    for j, comps in zip(job_rows, runner.generate_each(jobs) if jobs else []):
        results[j] = comps
    return results


def _output(key_field: str, key, rec: dict, comps: list | str) -> dict:
    out = {key_field: key}
    out.update({k: v for k, v in rec.items() if k not in RECORD_OPTIONS and k not in OUTPUT_FIELDS and k != "id"})
    if isinstance(comps, str):
        out["error"] = comps
        return out
    if len(comps) == 1:
        out["text"] = comps[0].text
    else:
        out["texts"] = [c.text for c in comps]
    out["finish_reason"] = comps[0].finish_reason if len(comps) == 1 else [c.finish_reason for c in comps]
    out["completion_tokens"] = sum(len(c.token_ids) for c in comps)
    return out
