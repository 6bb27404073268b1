"""Few-row matrix products for CPU decoding (csrc/rowmatmul_*.c): int8 weights with 15-bit activations,
and fp32 weights (a server's decode batch, or one row of a wide layer).

The C sources are compiled once per ISA variant with explicit instruction-set flags, never
-march=native, so a library runs on any CPU that has its features and a cache shared between machines is
safe. At run time the best variant this CPU supports is picked from its features (as ggml does):

    x86-64:  avx2 (AVX2 + FMA)  <  avx512 (AVX-512 F/BW/VL/DQ)  <  avx512_vnni (+ AVX512-VNNI)
    ARM64:   neon               <  neon_dotprod (ARMv8.2 dot product)

NEOJ_ISA=<variant> caps the choice (e.g. NEOJ_ISA=avx2 on an AVX-512 machine runs and measures the AVX2
build); NEOJ_ISA=none or NEOJ_COMPILE=0 turn the kernels off. A variant that fails to build or load is
skipped for the next lower one; with none, `available()` and `f32_available()` are False and callers
keep PyTorch's kernels.

Build safety: libraries are cached in $XDG_CACHE_HOME/neoj/kernels (else ~/.cache/...), created 0700
and used only while it and the library are owned by this user and writable by no one else (else the
build goes to a private temporary directory for this process); a library that fails to load is rebuilt
once; an fcntl lock lets one process build while the others wait for its result. Call `prepare()` when a
model is loaded so the compiler runs then, not inside the first request.
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
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
BLOCK = 256  # activations are scaled per block of this many values: in_features must be a multiple
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
    reasons = [unsafe_reason(real, leaf=True)] + [unsafe_reason(p, leaf=False) for p in real.parents]
    reasons = [r for r in reasons if r]
    if reasons:
        log.warning("kernel cache %s is not private (%s); building in a private temporary directory instead",
                    path, reasons[0])
        return None
    return real


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


# ---------------------------------------------------------------------------------------------
# A loaded variant


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  scales: torch.Tensor | None = None) -> None:
    """Raises ValueError unless x (M, K), weight (N, K), bias and scales (N,) are CPU tensors that fit:
    the C code trusts the sizes it is given, so a mismatch would read past a tensor's end."""
    tensors = [t for t in (x, weight, bias, scales) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the row kernels take CPU tensors")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"row kernel shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("scales", scales)):
        if t is not None and tuple(t.shape) != (weight.shape[0],):
            raise ValueError(f"row kernel {name} has shape {tuple(t.shape)}, not ({weight.shape[0]},)")


class Kernels:
    """The products of one loaded variant library."""

    def __init__(self, variant: Variant, lib: ctypes.CDLL, built: bool = False):
        self.variant, self.lib, self.built = variant, lib, built
        self.name = variant.name
        lib.neoj_rowmatmul_i8.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                          ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int]
        lib.neoj_rowmatmul_i8.restype = ctypes.c_int
        lib.neoj_rowmatmul_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                           ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        lib.neoj_rowmatmul_f32.restype = ctypes.c_int

    def __repr__(self) -> str:
        return f"Kernels({self.name})"

    def f32(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Returns x (M, K) @ weight (N, K)^T + bias as an (M, N) fp32 tensor, like F.linear.

        fp32 CPU tensors; K a multiple of 16. Each output row is summed in the same order for any M, so a
        row's values do not depend on the rows beside it.
        """
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or (
                bias is not None and bias.dtype != torch.float32):
            raise TypeError(f"f32_rowmatmul takes float32 tensors, got {x.dtype} and {weight.dtype}")
        _check_shapes(x, weight, bias)
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()  # kept referenced until the call returns
        M, K = x.shape
        N = weight.shape[0]
        y = torch.empty(M, N, dtype=torch.float32)
        bias_ptr = None if bias is None else bias.data_ptr()
        if self.lib.neoj_rowmatmul_f32(x.data_ptr(), M, K, weight.data_ptr(), N, bias_ptr, y.data_ptr()) != 0:
            raise RuntimeError(f"fp32 row kernel refused a ({M}, {K}) x ({N}, {K}) product")
        return y

    def int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """Returns x (M, K) @ (qweight (N, K) int8 * scales (N,) fp32)^T + bias, an (M, N) tensor in x's dtype.

        x and bias are float32 or bfloat16 (the same one); products and sums are exact integers per
        block of BLOCK activations scaled to 15 bits, then fp32. CPU tensors; K a multiple of BLOCK.
        A row's values do not depend on the rows beside it.
        """
        if x.dtype not in (torch.float32, torch.bfloat16) or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"int8_rowmatmul takes float32 or bfloat16 activations and bias, got {x.dtype}")
        if qweight.dtype != torch.int8 or scales.dtype != torch.float32:
            raise TypeError(f"int8_rowmatmul takes int8 weights and float32 scales, got {qweight.dtype} and "
                            f"{scales.dtype}")
        _check_shapes(x, qweight, bias, scales)
        x, qweight, scales = x.contiguous(), qweight.contiguous(), scales.contiguous()
        bias = None if bias is None else bias.contiguous()  # kept referenced until the call returns
        M, K = x.shape
        N = qweight.shape[0]
        y = torch.empty(M, N, dtype=x.dtype)
        bias_ptr = None if bias is None else bias.data_ptr()
        if self.lib.neoj_rowmatmul_i8(x.data_ptr(), M, K, qweight.data_ptr(), N, scales.data_ptr(), bias_ptr,
                                      y.data_ptr(), int(x.dtype == torch.bfloat16)) != 0:
            raise RuntimeError(f"int8 row kernel refused a ({M}, {K}) x ({N}, {K}) product")
        return y


def load(name: str) -> Kernels:
    """Returns the variant called `name` built and loaded (tests, benchmarks), even above NEOJ_ISA.

    Raises BuildError where this CPU lacks its features or it cannot be built."""
    variant = BY_NAME[name]
    if variant not in supported_variants():
        raise BuildError(f"this CPU cannot run the {name} kernels")
    lib, built = build(variant)
    return Kernels(variant, lib, built)


_selected: list = []  # [Kernels | None] once chosen: one variant per process
_select_lock = threading.Lock()  # server threads loading models at once choose (and build) once


def select() -> Kernels | None:
    """Returns the best variant that builds and loads here (at most NEOJ_ISA), or None; tries once per process."""
    for variant in candidate_variants():
        try:
            lib, built = build(variant)
            return Kernels(variant, lib, built)
        except (OSError, BuildError, subprocess.SubprocessError) as exc:
            log.warning("%s decode kernels unavailable (%s); trying a lower ISA", variant.name, exc)
    return None


def kernels() -> Kernels | None:
    """Returns this process's kernels, choosing (and building) them on the first call."""
    if not _selected:
        with _select_lock:
            if not _selected:
                _selected.append(select())
    return _selected[0]


def prepare() -> Kernels | None:
    """Builds and loads the kernels now (at model load), so no request waits for the compiler."""
    return kernels()


def available() -> bool:
    """True when the int8 kernel can be used in this process."""
    return kernels() is not None


def f32_available() -> bool:
    """True when the fp32 kernel can be used in this process."""
    return kernels() is not None


def variant_name() -> str:
    """Returns the variant in use ("avx2", "avx512", ...), or "none"."""
    k = kernels()
    return k.name if k is not None else "none"


def f32_rowmatmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Kernels.f32 of this process's variant; the caller checks `f32_available()` first."""
    return kernels().f32(x, weight, bias)


def int8_rowmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Kernels.int8 of this process's variant; the caller checks `available()` first."""
    return kernels().int8(x, qweight, scales, bias)
