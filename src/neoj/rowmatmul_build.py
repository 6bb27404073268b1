"""Building the few-row kernels (csrc/rowmatmul_*.c) for this CPU, safely, and loading them with ctypes.

The C sources are compiled once per ISA variant with explicit instruction-set flags, never
-march=native, so a library runs on any CPU that has its features and a cache shared between machines is
safe. The variants this CPU can run are found from its features (as ggml does):

    x86-64:  avx2 (AVX2 + FMA)  <  avx512 (AVX-512 F/BW/VL/DQ)  <  avx512_vnni (+ AVX512-VNNI)
    ARM64:   neon               <  neon_dotprod (ARMv8.2 dot product)

NEOJ_ISA=<variant> caps them (e.g. NEOJ_ISA=avx2 on an AVX-512 machine runs and measures the AVX2 build);
NEOJ_ISA=none or NEOJ_COMPILE=0 leave none.

Build safety: libraries are cached in $XDG_CACHE_HOME/neoj/kernels (else ~/.cache/...), created 0700
and used only while it and the library are owned by this user and writable by no one else (else the
build goes to a private temporary directory for this process); a library that fails to load is rebuilt
once; an fcntl lock lets one process build while the others wait for its result.

neoj.rowmatmul picks the variant a process uses and wraps its products for PyTorch tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ABI = 2  # NEOJ_ROWMATMUL_ABI in csrc/rowmatmul_common.c


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the CPU features it needs and the flags that enable exactly those."""

    name: str
    arch: str  # "x86_64" or "aarch64"
    needs: frozenset
    flags: tuple
    source: str

    def build_flags(self) -> list[str]:
        return [*COMMON_FLAGS, *self.flags]


_X86 = ("avx2", "fma")
_AVX512 = (*_X86, "avx512f", "avx512bw", "avx512vl", "avx512dq")
# Lowest first within each architecture: the order NEOJ_ISA caps.
VARIANTS = (
    Variant("avx2", "x86_64", frozenset(_X86), ("-mavx2", "-mfma"), "rowmatmul_x86.c"),
    Variant("avx512", "x86_64", frozenset(_AVX512),
            ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"), "rowmatmul_x86.c"),
    Variant("avx512_vnni", "x86_64", frozenset((*_AVX512, "avx512_vnni")),
            ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
            "rowmatmul_x86.c"),
    Variant("neon", "aarch64", frozenset(("asimd",)), ("-march=armv8-a",), "rowmatmul_arm.c"),
    Variant("neon_dotprod", "aarch64", frozenset(("asimd", "asimddp")), ("-march=armv8.2-a+dotprod",),
            "rowmatmul_arm.c"),
)
BY_NAME = {v.name: v for v in VARIANTS}


class BuildError(RuntimeError):
    """A variant could not be compiled or loaded."""


# ---------------------------------------------------------------------------------------------
# Which variants this CPU can run


def machine() -> str:
    """Returns "x86_64", "aarch64" or what platform.machine() says."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_features() -> frozenset:
    """Returns this CPU's feature names as Linux's /proc/cpuinfo spells them (x86 flags, ARM Features).

    The kernel lists a feature only where the OS also saves its registers (AVX-512 state included).
    macOS on ARM: NEON always, dot product from sysctl.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin" and machine() == "aarch64":
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True)
        return frozenset(("asimd", "asimddp") if out.stdout.strip() == "1" else ("asimd",))
    return frozenset()


def isa_cap() -> str | None:
    """Returns the variant NEOJ_ISA caps the choice at, "none", or None (no cap)."""
    want = os.environ.get("NEOJ_ISA", "").strip().lower()
    if not want or want == "native":
        return None
    if want != "none" and want not in BY_NAME:
        log.warning("NEOJ_ISA=%s is not one of %s (or none/native); ignoring it", want, ", ".join(BY_NAME))
        return None
    return want


def supported_variants(features: frozenset | None = None, arch: str | None = None) -> list[Variant]:
    """Returns the variants this CPU can run, best first, ignoring NEOJ_ISA."""
    features = cpu_features() if features is None else features
    arch = machine() if arch is None else arch
    return [v for v in reversed(VARIANTS) if v.arch == arch and v.needs <= features]


def usable_variants() -> list[Variant]:
    """Returns the variants this CPU can run, best first, capped by NEOJ_ISA (the CPU NEOJ_ISA simulates)."""
    cap = isa_cap()
    if cap == "none":
        return []
    found = supported_variants()
    if cap is not None:
        order = [v.name for v in VARIANTS]
        found = [v for v in found if BY_NAME[cap].arch == v.arch and order.index(v.name) <= order.index(cap)]
    return found


def candidate_variants() -> list[Variant]:
    """Returns the variants to try in this process, best first: usable ones, none if NEOJ_COMPILE=0."""
    return [] if os.environ.get("NEOJ_COMPILE", "1") == "0" else usable_variants()


# ---------------------------------------------------------------------------------------------
# Building and loading, safely


def compiler() -> str | None:
    """Returns the C compiler to use: $CC, else cc or gcc on PATH; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    """Returns where built libraries are kept (not checked: see private_cache_dir)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neoj" / "kernels"


def unsafe_reason(path: Path, leaf: bool) -> str | None:
    """Returns why another user could change what `path` holds, or None where only we (or root) can.

    The leaf (the cache directory or a library) must be ours and writable by no one else; a directory
    above it must be ours or root's and not writable by others unless sticky (as /tmp is), since whoever
    can write a parent can rename the leaf away and put their own in its place.
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot stat {path}: {exc}"
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is None:
        return None  # no POSIX ownership (Windows): nothing to check
    if stat.S_ISLNK(st.st_mode) and leaf:
        return f"{path} is a symbolic link"
    if leaf and st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not {uid}"
    if not leaf and st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}"
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and (leaf or not st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_cache_dir() -> Path | None:
    """Returns the cache directory, created 0700, if no other user can write it or a directory above it."""
    path = cache_dir()
    try:
        path.parent.parent.mkdir(parents=True, exist_ok=True)  # the user's cache directory, as it comes
        for own in (path.parent, path):  # neoj/ and neoj/kernels/: 0700 whatever the umask
            own.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        log.warning("kernel cache %s cannot be created (%s); building in a private temporary directory", path, exc)
        return None
    real = Path(os.path.realpath(path))
    reasons = [unsafe_reason(real, leaf=True)] + [unsafe_reason(parent, leaf=False) for parent in real.parents]
    reasons = [r for r in reasons if r]
    if reasons:
        log.warning("kernel cache %s is not private (%s); building in a private temporary directory instead",
                    path, reasons[0])
        return None
    return real


def inductor_cache_dir(capability: str) -> Path | None:
    """Returns a directory only this user can write for TorchInductor's kernels compiled under an ATen CPU
    capability cap (ATEN_CPU_CAPABILITY=`capability`), beside the kernel cache; None where that is not private."""
    base = private_cache_dir()
    if base is None:
        return None
    path = base.parent / f"inductor-{capability.lower()}"
    path.mkdir(exist_ok=True, mode=0o700)
    return path


@contextmanager
def build_lock(path: Path):
    """Holds an exclusive lock on `path` (created 0600): one process builds, the others wait for it."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): builds may race, each writes its own temp file and renames
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def sources(variant: Variant) -> list[Path]:
    """Returns the files a variant is compiled from: its C file and the shared code it includes."""
    return [CSRC / variant.source, CSRC / "rowmatmul_common.c"]


def library_name(variant: Variant, cc: str) -> str:
    """Returns the cached file name: the variant and a hash of the sources, compiler and flags."""
    h = hashlib.sha256()
    for path in sources(variant):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(" ".join([cc, *variant.build_flags()]).encode())
    return f"rowmatmul-{variant.name}-{h.hexdigest()[:16]}.so"


def compile_library(variant: Variant, cc: str, target: Path) -> None:
    """Compiles `variant` into `target`: built beside it and renamed, so no one ever sees half a library."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *variant.build_flags(), "-o", tmp, str(CSRC / variant.source)]
        out = subprocess.run(cmd, capture_output=True, timeout=300)
        if out.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed: {out.stderr.decode(errors='replace')[-800:]}")
        os.chmod(tmp, 0o700)  # whatever the umask: a library others may write is never loaded
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _close(lib: ctypes.CDLL) -> None:
    """Unloads a library that failed its checks, so that loading a rebuilt one at the same path maps the
    new file (the dynamic loader hands back a library already open under the same name)."""
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)
    except (ImportError, AttributeError, OSError):
        pass


def load_library(path: Path, variant: Variant) -> ctypes.CDLL:
    """Loads a built library and checks it is the variant and ABI this module expects.

    Raises OSError where it does not load, BuildError where it is not what it should be."""
    lib = ctypes.CDLL(str(path))
    try:
        lib.neoj_rowmatmul_variant.restype = ctypes.c_char_p
        got, abi = lib.neoj_rowmatmul_variant().decode(errors="replace"), lib.neoj_rowmatmul_abi()
        for name in ("neoj_rowmatmul_i8", "neoj_rowmatmul_f32"):
            getattr(lib, name)
    except AttributeError as exc:  # a symbol missing: some other library, or a stale one
        _close(lib)
        raise BuildError(f"{path} is not a neoj kernel library of this version ({exc})") from None
    if got != variant.name or abi != ABI:
        _close(lib)
        raise BuildError(f"{path} is variant {got} ABI {abi}, not {variant.name} ABI {ABI}")
    return lib


def build_in(directory: Path, variant: Variant, cc: str) -> tuple[ctypes.CDLL, bool]:
    """Returns the loaded library from `directory` (a private one), building it if needed, and whether
    this process built it. A cached library that is not private or does not load is rebuilt, once."""
    target = directory / library_name(variant, cc)
    built = False
    with build_lock(target.with_suffix(".lock")):
        if not target.exists() or unsafe_reason(target, leaf=True):
            compile_library(variant, cc, target)
            built = True
        try:
            return load_library(target, variant), built
        except (OSError, BuildError) as exc:
            if built:
                raise
            log.warning("cached kernel library %s does not load (%s); rebuilding it", target, exc)
            compile_library(variant, cc, target)
            return load_library(target, variant), True


def build(variant: Variant) -> tuple[ctypes.CDLL, bool]:
    """Returns `variant` loaded (built if not cached) and whether this process compiled it.

    Raises BuildError (no compiler, compile failure) or OSError (load failure)."""
    cc = compiler()
    if not cc:
        raise BuildError("no C compiler (set CC, or install cc/gcc)")
    directory = private_cache_dir()
    if directory is not None:
        return build_in(directory, variant, cc)
    with tempfile.TemporaryDirectory(prefix="neoj-kernels-") as tmp:  # 0700; removed once the library is mapped
        return build_in(Path(tmp), variant, cc)
