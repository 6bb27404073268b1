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
model (data parallelism), and write part files that one merge turns into the output:

  -o out.jsonl    output out.jsonl; parts out.jsonl.parts/part-00000.jsonl, part-00001.jsonl, ... (one per rank)
  -o out/         (an existing directory, or a name ending in "/") output out/output.jsonl; parts out/part-*.jsonl

A run first reads which records are done in the output and in every part file present (read-only: a partial
last line there is ignored, not cut), then rank r takes every world-th record of those left, starting at r,
and appends to its own part file, resumed like a single output (only its owner cuts its partial last line).
So a re-run with any number of ranks completes the rest, losing and repeating nothing. Rank 0 then waits
by watching the part files (not a collective: a share may take hours) until every record is written, and
merges: the output's records first, then the parts in name order, first copy of a key wins; lines are copied
byte for byte in input order to a temporary file, fsync'd, and renamed over the output; the part files are
removed. An existing output is only replaced when every line of it is a record of this input (all kept),
so a file neoj did not write is never overwritten. merge_batch does the merge alone (`neoj batch --merge`).
With a seed the records do not depend on the number of ranks: record i always samples with seed + i.
One process writes the output directly, as before, unless -o is a directory or a parts directory exists
(left by an unfinished run on several processes: it is resumed).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checks import not_utf8_error
from ..distributed import Processes
from ..errors import ContextLengthError
from ..model_utils import fit_prompt
from ..sampling import GenerationParams
from .runner import EngineRunner, Runner, TaskError, as_runner, task_params

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

MERGED_NAME = "output.jsonl"  # the merged output in a directory given as -o
PARTS_SUFFIX = ".parts"  # out.jsonl's parts go to out.jsonl.parts/
RUN_FILE = ".neoj-batch-run"  # written by rank 0, read by the others: proves they all see one directory
WAIT_SECONDS = (0.2, 2.0)  # rank 0 polls the part files this often: first, and at most while nothing changes

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


def _key(value) -> str:
    """Returns a canonical form of a record key (1 and "1" stay different)."""
    return json.dumps(value, ensure_ascii=False)


def read_inputs(path: str | Path) -> tuple[str, list[tuple[object, dict]]]:
    """Returns (key field, [(key, record)]) of a JSONL prompts file; raises TaskError naming a bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"cannot read input {path}: {exc.strerror or exc}") from None
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise TaskError(str(not_utf8_error(f"input {path}", raw[exc.start], exc.start))) from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise TaskError(f"{path}:{n}: not a JSON object: {exc}") from None
        if not isinstance(rec, dict):
            raise TaskError(f"{path}:{n}: expected a JSON object with a \"prompt\", got {type(rec).__name__}")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise TaskError(f"{path}:{n}: \"prompt\" must be a non-empty string")
        if isinstance(rec.get("stop"), str):
            rec["stop"] = [rec["stop"]]
        records.append((n, rec))
    if not records:
        raise TaskError(f"input {path} has no records: give one JSON object with a \"prompt\" per line")
    with_id = [n for n, r in records if "id" in r]
    if not with_id:
        return "line", records
    if len(with_id) != len(records):
        missing = next(n for n, r in records if "id" not in r)
        raise TaskError(f"{path}:{missing}: this record has no \"id\" but others do; give every record an id, "
                        "or none (records are then keyed by line number)")
    seen: dict[str, int] = {}
    for n, r in records:
        if isinstance(r["id"], bool) or not isinstance(r["id"], (str, int)):
            raise TaskError(f"{path}:{n}: \"id\" must be a string or an integer, got {r['id']!r}")
        k = _key(r["id"])
        if k in seen:
            raise TaskError(f"{path}:{n}: id {r['id']!r} already appears on line {seen[k]}; ids must be unique")
        seen[k] = n
    return "id", [(r["id"], r) for _, r in records]


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
        try:
            rec = json.loads(line)
        except ValueError:
            raise TaskError(f"{path}:{n}: not a JSON line; this file was not written by neoj batch, or was "
                            "edited: fix it, or write to a new output file") from None
        if not isinstance(rec, dict) or key_field not in rec:
            raise TaskError(f"{path}:{n}: the record has no {key_field!r}; was this output written for another "
                            "input? Write to a new output file")
        done.add(_key(rec[key_field]))
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
    part file that rank 0 merges; an output directory uses part files on one process too (module docstring).
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
    pending = [(i, k, r) for i, (k, r) in enumerate(records) if _key(k) not in done]
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


# ---- several processes: part files and their merge ----


@dataclass(frozen=True)
class BatchLayout:
    """Where a batch's merged output and part files go (see the module docstring)."""

    output: Path
    parts: Path
    directory: bool  # -o named a directory: the parts lie in it, beside output.jsonl

    def part(self, rank: int) -> Path:
        """Returns rank's part file."""
        return self.parts / f"part-{rank:05d}.jsonl"

    def part_files(self) -> list[Path]:
        """Returns the part files present, in name (= rank) order."""
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.glob("part-*.jsonl") if p.is_file())


def batch_layout(output: str | Path) -> BatchLayout:
    """Returns the layout -o gives: a directory (existing, or a name ending in "/") or an output file."""
    path = Path(output).expanduser()
    if path.is_dir() or str(output).endswith(("/", os.sep)):
        return BatchLayout(path / MERGED_NAME, path, True)
    return BatchLayout(path, path.with_name(path.name + PARTS_SUFFIX), False)


def uses_parts(output: str | Path, world: int = 1) -> bool:
    """Returns whether a run writes part files: several ranks, a directory as output, or parts left to resume."""
    layout = batch_layout(output)
    return world > 1 or layout.directory or layout.parts.is_dir()


@dataclass
class MergeResult:
    """What a merge did: records in the input, in the output now, still missing, and duplicate keys met."""

    total: int
    merged: int
    missing: int
    duplicates: int  # keys found in more than one file (an interrupted merge, or parts of an earlier run)
    conflicts: int  # ... of those, keys whose lines differ: the first (output, then parts by name) was kept
    output: Path
    parts: int  # part files read
    written: bool  # False when there was nothing to write (no part files)


def _complete_lines(path: Path):
    """Yields (line number, start offset, line bytes) of a file's complete lines; a partial last line is ignored
    (read-only: cutting it is for the file's owner)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc.strerror or exc}") from None
    start = 0
    for n, line in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
        yield n, start, line
        start += len(line) + 1


def _index(sources: list[Path], key_field: str, input_keys: set[str], input_path) -> tuple[dict, int, int]:
    """Returns ({key: (source number, offset, length, hash)}, duplicates, conflicts) of the records in `sources`,
    the first copy of a key winning; raises TaskError for a line that is no record of this input."""
    index: dict[str, tuple[int, int, int, int]] = {}
    duplicates = conflicts = 0
    for s, path in enumerate(sources):
        for n, start, line in _complete_lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise TaskError(f"{path}:{n}: not a JSON line; this file was not written by neoj batch, or was "
                                "edited: fix it, or write to a new output") from None
            if not isinstance(rec, dict) or key_field not in rec or _key(rec[key_field]) not in input_keys:
                raise TaskError(f"{path}:{n}: not a record of the input {input_path} (no such {key_field!r}); was "
                                "it written for another input? Write to a new output")
            key, entry = _key(rec[key_field]), (s, start, len(line), hash(line))
            if key not in index:
                index[key] = entry
                continue
            duplicates += 1
            conflicts += index[key][3] != entry[3]
    return index, duplicates, conflicts


def _sources(layout: BatchLayout) -> list[Path]:
    """Returns the files holding records, in the order their copies win: the output, then the parts by name."""
    return ([layout.output] if layout.output.is_file() else []) + layout.part_files()


def _check_paths(input_path, layout: BatchLayout) -> None:
    """Raises TaskError when the input would be written over or read as a part."""
    inp = Path(input_path).resolve()
    if inp == layout.output.resolve() or inp.parent == layout.parts.resolve() and inp.name.startswith("part-"):
        raise TaskError(f"the output {layout.output} (or its parts) must not be the input file; choose another -o")
    if layout.output.is_dir():
        raise TaskError(f"the output {layout.output} is a directory; give another -o")


class ReportedByRankZero(TaskError):
    """An error in the input or output that rank 0 reports: the other ranks stop with it without saying it again."""


@dataclass
class _Plan:
    key_field: str
    records: list
    pending: list[int]  # input indices of the records not yet done anywhere, shared by every rank
    skipped: int
    token: str  # this run's, in RUN_FILE until rank 0 has merged


def _plan(input_path, layout: BatchLayout, processes: Processes) -> _Plan:
    """Returns what is left to do, as rank 0 reads it, on every rank (one broadcast, before anyone writes).

    Rank 0 creates the parts directory and a file with a fresh token in it; the others check they see it,
    so ranks on machines that do not share the output's file system fail at once instead of never merging."""
    reply = None
    if processes.main:
        try:
            key_field, records = read_inputs(input_path)
            _check_paths(input_path, layout)
            index, _, _ = _index(_sources(layout), key_field, {_key(k) for k, _ in records}, input_path)
            pending = [i for i, (k, _) in enumerate(records) if _key(k) not in index]
            token = uuid.uuid4().hex
            try:
                layout.parts.mkdir(parents=True, exist_ok=True)
                _write_file(layout.parts / RUN_FILE, token.encode())
            except OSError as exc:
                raise TaskError(f"cannot write the part files in {layout.parts}: {exc.strerror or exc}; "
                                "choose an -o you can write to") from None
            reply = ("ok", pending, token, len(records))
        except TaskError as exc:
            reply = ("error", str(exc))
    reply = processes.broadcast(reply)
    if reply[0] == "error":
        raise (TaskError if processes.main else ReportedByRankZero)(reply[1])
    _, pending, token, total = reply
    if not processes.main:
        key_field, records = read_inputs(input_path)
    if total != len(records):
        raise TaskError(f"rank {processes.rank} reads {len(records)} records in {input_path}, rank 0 {total}: "
                        "every rank must read the same input")
    if not processes.main and _run_token(layout) != token:
        raise TaskError(f"rank {processes.rank} does not see the files rank 0 wrote in {layout.parts}: with "
                        "several machines, -o must be on a file system they all share")
    return _Plan(key_field, records, pending, len(records) - len(pending), token)


def _run_parts(lm, input_path, layout: BatchLayout, processes: Processes, defaults: dict, batch_size: int,
               progress: bool) -> BatchResult:
    """Generates this rank's share of what is left into its part file; rank 0 then waits for all and merges."""
    plan = _plan(input_path, layout, processes)
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
            _wait_for_parts(layout, plan, stop_early=not processes.main)
            if processes.main:
                _merge(input_path, layout, plan.key_field, plan.records, allow_partial=False)
        except KeyboardInterrupt:
            interrupted = True
    if not processes.main:
        return BatchResult(total, plan.skipped, written, part, interrupted, processes.world)
    done = total if not interrupted else plan.skipped + written
    return BatchResult(total, plan.skipped, done - plan.skipped, layout.output, interrupted, processes.world)


def _wait_for_parts(layout: BatchLayout, plan: _Plan, stop_early: bool = False) -> None:
    """Returns once every pending record has a complete line in some part file (the other ranks are done), or
    with stop_early, once rank 0 has merged (this run's RUN_FILE is gone: it may remove the parts first).

    Polls the files, reading only what was appended since, instead of a collective that would time out
    while a slower rank works through a long share. A rank that fails makes torchrun stop this one."""
    wanted = {_key(plan.records[i][0]) for i in plan.pending}
    offsets: dict[Path, int] = {}
    delay = WAIT_SECONDS[0]
    logged = False
    while True:
        before = len(wanted)
        for path in layout.part_files():
            offsets[path] = _read_new_keys(path, offsets.get(path, 0), plan.key_field, wanted)
        if not wanted or stop_early and _run_token(layout) != plan.token:
            return
        if not logged:
            log.info("waiting for the other ranks: %d records to go", len(wanted))
            logged = True
        delay = WAIT_SECONDS[0] if len(wanted) < before else min(delay * 2, WAIT_SECONDS[1])
        time.sleep(delay)


def _run_token(layout: BatchLayout) -> str | None:
    """Returns the token of the run whose parts are in layout (None once merged)."""
    try:
        return (layout.parts / RUN_FILE).read_text()
    except OSError:
        return None


def _read_new_keys(path: Path, offset: int, key_field: str, wanted: set[str]) -> int:
    """Removes from `wanted` the keys of the complete lines of path after offset; returns the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:  # removed meanwhile (a merge by hand): read again next time
        return 0
    end = data.rfind(b"\n") + 1
    for line in data[:end].split(b"\n")[:-1]:
        try:
            wanted.discard(_key(json.loads(line)[key_field]))
        except (ValueError, KeyError, TypeError):
            pass  # not a record: the merge names the line
    return offset + end


def merge_batch(input_path: str | Path, output: str | Path, *, allow_partial: bool = False) -> MergeResult:
    """Writes the output of a batch run on several processes from its part files, in input order; returns what it did.

    Refuses (TaskError) while records are missing, unless allow_partial: then it writes those there are and
    keeps the part files, so a later run still resumes (a run may still be writing them). The output is written
    to a temporary file, fsync'd and renamed, and the part files are removed once it holds every record.
    """
    layout = batch_layout(output)
    _check_paths(input_path, layout)
    key_field, records = read_inputs(input_path)
    if not layout.part_files() and not layout.output.is_file():
        raise TaskError(f"nothing to merge: no part files in {layout.parts} and no output {layout.output}; "
                        "run neoj batch first")
    return _merge(input_path, layout, key_field, records, allow_partial)


def _merge(input_path, layout: BatchLayout, key_field: str, records: list, allow_partial: bool) -> MergeResult:
    """Merges the output and the part files into the output (see merge_batch); returns what it did."""
    sources = _sources(layout)
    parts = layout.part_files()
    index, duplicates, conflicts = _index(sources, key_field, {_key(k) for k, _ in records}, input_path)
    missing = [k for k, _ in records if _key(k) not in index]
    if missing and not allow_partial:
        raise TaskError(f"{len(missing)} of {len(records)} records are not generated yet (the first: {key_field} "
                        f"{missing[0]!r}); run the same neoj batch again to generate them, or merge what there is "
                        "with --allow-partial")
    if conflicts:
        log.warning("%d records appear more than once with different text (generated twice with different "
                    "settings?): kept the first of each, the output's copy before the parts' in name order", conflicts)
    if parts:  # else the output alone holds what there is: nothing to write
        _write_merged(layout.output, sources, [index[_key(k)] for k, _ in records if _key(k) in index])
    if not missing:
        _remove_parts(layout, parts)
    return MergeResult(len(records), len(index), len(missing), duplicates, conflicts, layout.output, len(parts),
                       written=bool(parts))


def _write_merged(output: Path, sources: list[Path], entries: list[tuple[int, int, int, int]]) -> None:
    """Writes the lines at `entries` (source, offset, length) to output, atomically: temporary file, fsync, rename."""
    tmp = output.with_name(f".{output.name}.merging")
    fds = []
    try:
        fds = [os.open(path, os.O_RDONLY) for path in sources]
        with open(tmp, "wb") as f:
            for s, start, length, _ in entries:
                f.write(os.pread(fds[s], length, start) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
        _fsync_dir(output.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TaskError(f"cannot write the merged output {output}: {exc.strerror or exc}") from None
    finally:
        for fd in fds:
            os.close(fd)


def _remove_parts(layout: BatchLayout, parts: list[Path]) -> None:
    """Removes the part files (the output now holds their records), the run file, and a parts directory left empty."""
    for path in [*parts, layout.parts / RUN_FILE]:
        path.unlink(missing_ok=True)
    if not layout.directory:
        try:
            layout.parts.rmdir()
        except OSError:  # something else is in it: not ours to remove
            pass


def _write_file(path: Path, data: bytes) -> None:
    """Writes a small file whole and fsync'd."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes a rename in directory `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


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
