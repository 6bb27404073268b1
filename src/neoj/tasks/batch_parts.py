"""The files of `neoj batch`: its input, and on several processes, the part files and their merge.

neoj.tasks.batch generates; this module generates nothing and loads no model. It reads the input
(read_inputs), says where part files go (batch_layout, uses_parts), plans a run on every rank (plan_parts),
waits for the other ranks' part files (wait_for_parts) and merges them (merge_batch, merge_parts).

Several processes (torchrun, or `processes=` given to run_batch) split the records, each with its own full
copy of the model (data parallelism), and write part files that one merge turns into the output:

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

from ..checks import not_utf8_error
from ..distributed import Processes
from .runner import TaskError

log = logging.getLogger(__name__)

MERGED_NAME = "output.jsonl"  # the merged output in a directory given as -o
PARTS_SUFFIX = ".parts"  # out.jsonl's parts go to out.jsonl.parts/
RUN_FILE = ".neoj-batch-run"  # written by rank 0, read by the others: proves they all see one directory
WAIT_SECONDS = (0.2, 2.0)  # rank 0 polls the part files this often: first, and at most while nothing changes


def record_key(value) -> str:
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
        k = record_key(r["id"])
        if k in seen:
            raise TaskError(f"{path}:{n}: id {r['id']!r} already appears on line {seen[k]}; ids must be unique")
        seen[k] = n
    return "id", [(r["id"], r) for _, r in records]


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


def output_record(path: Path, n: int, line: bytes) -> dict:
    """Returns the record on line n of an output or part file; raises TaskError when the line is not a JSON object."""
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        raise TaskError(f"{path}:{n}: not a JSON line; this file was not written by neoj batch, or was edited: fix it, "
                        "or write to a new output file")
    return rec


def _index(sources: list[Path], key_field: str, input_keys: set[str], input_path) -> tuple[dict, int, int]:
    """Returns ({key: (source number, offset, length, hash)}, duplicates, conflicts) of the records in `sources`,
    the first copy of a key winning; raises TaskError for a line that is no record of this input."""
    index: dict[str, tuple[int, int, int, int]] = {}
    duplicates = conflicts = 0
    for s, path in enumerate(sources):
        for n, start, line in _complete_lines(path):
            if not line.strip():
                continue
            rec = output_record(path, n, line)
            if key_field not in rec or record_key(rec[key_field]) not in input_keys:
                raise TaskError(f"{path}:{n}: not a record of the input {input_path} (no such {key_field!r}); was "
                                "it written for another input? Write to a new output")
            key, entry = record_key(rec[key_field]), (s, start, len(line), hash(line))
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
class PartsPlan:
    """What a run on part files does, the same on every rank: the input's records and which of them are left."""

    key_field: str
    records: list
    pending: list[int]  # input indices of the records not yet done anywhere, shared by every rank
    skipped: int
    token: str  # this run's, in RUN_FILE until rank 0 has merged


def plan_parts(input_path, layout: BatchLayout, processes: Processes) -> PartsPlan:
    """Returns what is left to do, as rank 0 reads it, on every rank (one broadcast, before anyone writes).

    Rank 0 creates the parts directory and a file with a fresh token in it; the others check they see it,
    so ranks on machines that do not share the output's file system fail at once instead of never merging."""
    reply = None
    if processes.main:
        try:
            key_field, records = read_inputs(input_path)
            _check_paths(input_path, layout)
            index, _, _ = _index(_sources(layout), key_field, {record_key(k) for k, _ in records}, input_path)
            pending = [i for i, (k, _) in enumerate(records) if record_key(k) not in index]
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
    # Every rank looks before any goes on: rank 0 may otherwise finish (nothing left to do), merge and remove the
    # run file before a slower rank has looked for it.
    blind = [rank for rank, sees in enumerate(processes.gather(_run_token(layout) == token)) if not sees]
    if blind:
        message = (f"rank {', '.join(map(str, blind))} does not see the files rank 0 wrote in {layout.parts}: with "
                   "several machines, -o must be on a file system they all share")
        raise (TaskError if processes.main else ReportedByRankZero)(message)
    return PartsPlan(key_field, records, pending, len(records) - len(pending), token)


def wait_for_parts(layout: BatchLayout, plan: PartsPlan, stop_early: bool = False) -> None:
    """Returns once every pending record has a complete line in some part file (the other ranks are done), or
    with stop_early, once rank 0 has merged (this run's RUN_FILE is gone: it may remove the parts first).

    Polls the files, reading only what was appended since, instead of a collective that would time out
    while a slower rank works through a long share. A rank that fails makes torchrun stop this one."""
    wanted = {record_key(plan.records[i][0]) for i in plan.pending}
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
            wanted.discard(record_key(json.loads(line)[key_field]))
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
    return merge_parts(input_path, layout, key_field, records, allow_partial)


def merge_parts(input_path, layout: BatchLayout, key_field: str, records: list, allow_partial: bool) -> MergeResult:
    """Merges the output and the part files into the output (see merge_batch); returns what it did."""
    sources = _sources(layout)
    parts = layout.part_files()
    index, duplicates, conflicts = _index(sources, key_field, {record_key(k) for k, _ in records}, input_path)
    missing = [k for k, _ in records if record_key(k) not in index]
    if missing and not allow_partial:
        raise TaskError(f"{len(missing)} of {len(records)} records are not generated yet (the first: {key_field} "
                        f"{missing[0]!r}); run the same neoj batch again to generate them, or merge what there is "
                        "with --allow-partial")
    if conflicts:
        log.warning("%d records appear more than once with different text (generated twice with different "
                    "settings?): kept the first of each, the output's copy before the parts' in name order", conflicts)
    if parts:  # else the output alone holds what there is: nothing to write
        _write_merged(layout.output, sources, [index[record_key(k)] for k, _ in records if record_key(k) in index])
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
