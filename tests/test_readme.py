"""README.md's commands run as written, so the guide cannot go stale.

Every fenced ```bash block of README.md is split into commands (a command's continuation lines and
here-documents stay with it). A command is skipped only when a rule in SKIP below says why: it downloads
from the Hugging Face Hub, needs GPUs or a second machine, runs until stopped (a server), needs a program
neoj does not install, or reads a file the reader brings (report.txt, ...). Every other command runs,
block by block in README order, in one fresh directory, the way a reader would type them top to bottom:
later blocks use the files earlier ones wrote. Each block runs under `bash -e -o pipefail` with the
test's Python environment first on PATH (the `neoj` and `torchrun` of this install), offline
(HF_HUB_OFFLINE=1). ```python blocks are held to the same rules and run with this Python.

The README's own commands keep their step counts small (`--max-steps 20`), so no hook is needed to make
them quick. On a shared 2-core machine the whole guide takes two to three minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_TIMEOUT = 600  # seconds for one block; the slowest (a fine-tune) takes about one minute

# (pattern, reason): a command matching a pattern is not run, for that reason. Checked in order.
SKIP: list[tuple[str, str]] = [
    (r"\bpip install\b", "installs neoj or other packages: CI runs the Quick start's install itself"),
    (r"--nnodes\b", "needs a second machine (multi-node torchrun), GPUs and a Hub download"),
    (r"\blm_eval\b", "needs lm-evaluation-harness, a running server and lm-eval's data sets from the Hub"),
    (r"\bneoj serve\b|127\.0\.0\.1:8000", "a server: runs until stopped, or needs one running (tests/test_server_*)"),
    (r"--config gpt-neo-125m\b.*--data corpus/", "a pre-training run: GPUs and a corpus of the reader's own"),
    (r"\b(report\.txt|notes\.md|history\.txt|reviews\.txt|labelled\.jsonl|utils\.py|prompts\.jsonl)\b",
     "reads a file of the reader's own (the Tasks examples)"),
    (r"\bEleutherAI/", "downloads a checkpoint from the Hugging Face Hub"),
]


@dataclass
class Block:
    lang: str  # "bash" or "python"
    line: int  # 1-based line of the opening fence
    section: str
    text: str


@dataclass
class Command:
    block: Block
    text: str  # as written, here-documents included
    shell: str  # what the rules look at: the command without its here-document bodies
    skip: str | None  # the reason it is not run, or None


def read_blocks(text: str) -> list[Block]:
    """Returns README's ```bash and ```python blocks with the ## section each is in."""
    blocks, section, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = re.match(r"^```(\w*)\s*$", line)
        if m:
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            if m.group(1) in ("bash", "sh", "shell", "python"):
                lang = "python" if m.group(1) == "python" else "bash"
                blocks.append(Block(lang, i + 1, section, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return blocks


def split_commands(block: Block) -> list[tuple[str, str]]:
    """Returns a bash block's commands as (text, text without here-document bodies).

    A command's continuation lines and here-document bodies stay with it.
    """
    if block.lang == "python":
        return [(block.text, block.text)]
    out, lines, i = [], block.text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cmd = [line]
        while cmd[-1].endswith("\\") and i < len(lines):
            cmd.append(lines[i])
            i += 1
        shell = "\n".join(cmd)
        for m in re.finditer(r"<<-?\s*(['\"]?)(\w+)\1", shell):
            while i < len(lines):
                cmd.append(lines[i])
                i += 1
                if cmd[-1].strip() == m.group(2):
                    break
        out.append(("\n".join(cmd), shell))
    return out


def skip_reason(command: str) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, command):
            return reason
    return None


def readme_commands() -> list[Command]:
    return [Command(b, text, shell, skip_reason(shell)) for b in read_blocks(README.read_text(encoding="utf-8"))
            for text, shell in split_commands(b)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # One thread per process: on a busy machine OpenMP's spinning makes small models far slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_the_guides_commands_are_found():
    commands = readme_commands()
    run = [c for c in commands if c.skip is None]
    assert any("neoj finetune" in c.text for c in run) and any("neoj train" in c.text for c in run)
    assert any("neoj merge" in c.text for c in run) and any("neoj eval perplexity" in c.text for c in run)
    assert any("torchrun" in c.text for c in run)
    assert any(c.block.lang == "python" for c in run)
    # A here-document stays with its command: the data files are written by three commands.
    assert [c.text.splitlines()[0] for c in run if "<<'EOF'" in c.text][:3] == [
        "cat > notes.txt <<'EOF'", "cat > docs.jsonl <<'EOF'", "cat > qa.jsonl <<'EOF'"]


def test_every_skip_rule_is_needed():
    """A rule no README command matches any more is stale: remove it."""
    commands = readme_commands()
    for pattern, reason in SKIP:
        assert any(re.search(pattern, c.shell) for c in commands), f"no README command matches {pattern!r} ({reason})"


def test_new_sections_skip_only_hub_gpu_multinode_or_server_commands():
    """In the fine-tuning and evaluation guide, everything a laptop can run is run."""
    allowed = {reason for pattern, reason in SKIP if "reader's own (the Tasks" not in reason}
    for c in readme_commands():
        if c.block.section in ("Fine-tuning and training", "Evaluating") and c.skip is not None:
            assert c.skip in allowed, (c.text, c.skip)


def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands()
    by_block: dict[int, list[Command]] = {}
    for c in commands:
        by_block.setdefault(c.block.line, []).append(c)
    skipped = [c for c in commands if c.skip is not None]
    ran, started = 0, time.perf_counter()
    env = _env()
    for line, cmds in by_block.items():
        todo = [c for c in cmds if c.skip is None]
        if not todo:
            continue
        block = todo[0].block
        if block.lang == "python":
            argv, script = [sys.executable, "-c", block.text], block.text
        else:
            script = "set -eo pipefail\n" + "\n".join(c.text for c in todo) + "\n"
            argv = ["bash", "-c", script]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"README.md:{line} ({block.section}) ran over {BLOCK_TIMEOUT} s:\n{script}\n"
                        f"{(exc.stderr or b'')[-3000:]!r}")
        assert proc.returncode == 0, (f"README.md:{line} ({block.section}) failed with status {proc.returncode}:\n"
                                      f"{script}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
                                      f"--- stderr ---\n{proc.stderr[-5000:]}")
        ran += len(todo)
        print(f"README.md:{line}: {len(todo)} command(s) in {time.perf_counter() - t0:.1f} s ({block.section})")
    print(f"{ran} commands run in {time.perf_counter() - started:.0f} s; {len(skipped)} skipped:")
    for c in skipped:
        print(f"  README.md:{c.block.line}: {c.text.splitlines()[0][:90]}  -- {c.skip}")
    assert ran >= 20
