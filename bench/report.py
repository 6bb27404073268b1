"""What the bench/*.py scripts share: their section of BENCHMARKS.md and the lines that describe the run.

Every benchmark writes one marked section of BENCHMARKS.md (or prints it), and under its tables says on what
machine, with which software and at which git revision it ran. This module holds the one copy of each of
those helpers; the tables themselves stay in the scripts.

The scripts run as `python bench/bench_x.py` (then bench/ is sys.path[0] and `from report import ...`
works as it is) or as `python -m bench.bench_x` from the repository root (each script puts bench/ on
sys.path before importing this module).

Nothing here imports neoj or torch at module level, and nothing here imports neoj at all: importing neoj
sets OMP_WAIT_POLICY in os.environ, which the worker processes of bench_core and bench_quant inherit, and
bench_threads' workers must import neoj before torch. So a parent process can describe the machine without
changing what its workers measure.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The SIMD features a Machine line lists when a script asks for no other set: the ones neoj's CPU kernels
# choose between (x86: AVX2+FMA, AVX-512 and its VNNI/BF16 parts, AMX; ARM: NEON and its dot product).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "asimddp")


# ---------------------------------------------------------------------------------------------
# The section of BENCHMARKS.md


def section_markers(name: str, tag: str = "") -> tuple[str, str]:
    """Returns the HTML comments that delimit a script's section: `<!-- NAME:begin -->`, `<!-- NAME:end -->`.

    `tag` tells apart several sections of one script (bench_int8_kernel's `[avx2]` for a forced ISA,
    bench_portable's `[threads=1]`): `<!-- NAMETAG:begin -->`.
    """
    return f"<!-- {name}{tag}:begin -->", f"<!-- {name}{tag}:end -->"


def write_section(out: str | Path, text: str, begin: str, end: str,
                  log: Callable[[str], None] | None = None) -> None:
    """Writes a section (`text`, from its `begin` marker to its `end` marker) into the markdown file `out`.

    `out` "-" prints the text to stdout instead. When the file already has both markers, the bytes from
    `begin` to `end` (inclusive) are replaced by the text (its trailing newlines dropped) and everything
    before and after them is kept as it is; otherwise the text is appended after one blank line. A file
    that does not exist starts as "# Benchmarks". `log`, when given, is told the path written.
    """
    if str(out) == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    doc = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in doc and end in doc:
        before, rest = doc.split(begin, 1)
        doc = before + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)
    if log:
        log(f"wrote section to {path}")


def logger(name: str) -> Callable[[str], None]:
    """Returns a script's progress log: `log(msg)` prints `[NAME HH:MM:SS] msg` to stderr, flushed."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------------------------
# The machine


def loadavg(missing: str = "?") -> str:
    """Returns the 1, 5 and 15 minute load averages as /proc/loadavg writes them ("0.52 0.61 0.70"), or
    `missing` where there is no /proc/loadavg."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return missing


def cpu_model() -> str | None:
    """Returns the CPU's model name from /proc/cpuinfo ("AMD EPYC 9R14 96-Core Processor"), or None where it
    has none (ARM Linux lists no model name; macOS has no /proc/cpuinfo): each script has its own fallback."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_features() -> frozenset[str]:
    """Returns this CPU's feature names as Linux's /proc/cpuinfo spells them (x86 `flags`, ARM `Features`).

    The same answer as neoj.rowmatmul.cpu_features() (macOS on ARM: NEON always, dot product from sysctl),
    read here so that describing the machine does not import neoj (see the module's docstring).
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin" and platform.machine().lower() in ("arm64", "aarch64"):
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True)
        return frozenset(("asimd", "asimddp") if out.stdout.strip() == "1" else ("asimd",))
    return frozenset()


def cpu_flags(wanted: Iterable[str] = ISA_FLAGS) -> list[str]:
    """Returns the features of `wanted` this CPU has, in `wanted`'s order."""
    features = cpu_features()
    return [f for f in wanted if f in features]


def cpu_description(wanted: Iterable[str] = ISA_FLAGS) -> tuple[str, str]:
    """Returns (CPU model, its features of `wanted` joined by ", "); the model falls back to
    platform.processor(), then platform.machine()."""
    model = cpu_model() or platform.processor() or platform.machine()
    return model, ", ".join(cpu_flags(wanted))


# ---------------------------------------------------------------------------------------------
# The software


def package_version(name: str, missing: str = "?") -> str:
    """Returns the installed version of a distribution ("2.5.1+cpu"), or `missing` when it is not installed.

    For torch this is torch.__version__ without importing torch.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return missing


def git_rev(dirty_note: str = "", paths: Iterable[str] = ("src",), untracked: bool = True) -> str:
    """Returns neoj's short git revision ("?" when git cannot tell), followed by `dirty_note` when the
    working tree has uncommitted changes under `paths` (untracked files count unless `untracked` is False).
    With no `dirty_note` the working tree is not looked at."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        if not rev:
            return "?"
        if dirty_note:
            cmd = ["git", "-C", str(REPO), "status", "--porcelain"]
            cmd += [] if untracked else ["--untracked-files=no"]
            if subprocess.run([*cmd, "--", *paths], capture_output=True, text=True).stdout.strip():
                rev += dirty_note
        return rev
    except OSError:
        return "?"


def software_line(packages: Iterable[str], missing: str = "?", python: bool = False, rev: str | None = None) -> str:
    """Returns "[python X, ]pkg X, pkg Y, neoj git REV": the packages' versions (`missing` for one not
    installed) and `rev` (default: git_rev())."""
    parts = [f"python {platform.python_version()}"] if python else []
    parts += [f"{name} {package_version(name, missing)}" for name in packages]
    return ", ".join(parts) + f", neoj git {git_rev() if rev is None else rev}"


def date_line() -> str:
    """Returns "- Date: YYYY-MM-DD; torch X; neoj git REV", the line under bench_adapters', bench_threads' and
    the kernel benchmarks' headings."""
    return f"- Date: {datetime.date.today()}; torch {package_version('torch')}; neoj git {git_rev()}"


def shared_note(load: str, consequence: str) -> list[str]:
    """Returns a line saying the machine was shared (the 1-minute load average at start above 1), then what that
    does to this benchmark's figures; none on a quiet machine."""
    try:
        busy = float(load.split()[0]) > 1.0
    except (ValueError, IndexError):
        busy = False
    return [f"- The machine was shared during this run (load average above): {consequence}"] if busy else []


def busy_note(load: str) -> list[str]:
    """Returns shared_note's line for the with/without benchmarks, whose ratios come from interleaved runs."""
    return shared_note(load, "absolute times and tokens/s are lower than on an idle machine (compare bench_core); "
                       "the with/without ratios come from interleaved runs in one process and are the numbers to read.")
