"""Building and loading the optional C++/CUDA extension ``whale_ops`` (``torch.ops.whale.*``).

The package itself stays pure Python: a pip build of a CUDA extension would run in an isolated
environment that downloads its own torch, possibly not the user's CUDA build. Instead the
extension is compiled on demand, against the torch that is installed, by
:func:`torch.utils.cpp_extension.load` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), and loaded from there by later processes. The build
directory's name is a hash of the sources, the torch and Python versions and the flags, so a
stale library is never loaded: changed sources or a new torch mean "not built" until the next
``whale build-ext``.

Example::

    from whale import csrc_build

    csrc_build.build(verbose=True)   # once per machine and torch version
    csrc_build.load_prebuilt()       # later processes: load from the cache, never compile
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "build",
    "build_directory",
    "cuda_wanted",
    "load_prebuilt",
    "ops_registered",
    "python_entry",
    "sources",
]

EXTENSION_NAME = "whale_ops"
_CPU_SOURCES = ("whale_ops.cpp", "whale_ops_py.cpp")
_CUDA_SOURCES = ("whale_ops_cuda.cpp", "whale_ops_cuda_kernels.cu")
_HEADERS = ("whale_ops.h", "whale_ops_cuda_kernels.h")
_CUDA_CFLAGS = ("-O3",)


def source_dir() -> Path:
    """The directory holding the C++/CUDA sources.

    ``whale/csrc`` inside the installed package comes first, then ``<repo>/csrc`` of a source
    checkout.

    Raises:
        FileNotFoundError: neither place holds ``whale_ops.cpp``.
    """
    package_dir = Path(__file__).resolve().parent
    candidates = (package_dir / "csrc", package_dir.parent / "csrc")
    for candidate in candidates:
        if (candidate / _CPU_SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"whale: no extension sources ({_CPU_SOURCES[0]}) in {' or '.join(map(str, candidates))}; "
        "reinstall whale (the wheel ships them as package data) or build from a source checkout"
    )


def cuda_wanted() -> bool:
    """Whether a build includes the CUDA kernels: a CUDA torch, a visible GPU and ``CUDA_HOME``."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _host_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compiler and linker flags for the C++ sources on this machine."""
    cflags = ["-O3", "-ffp-contract=off"]  # no fused multiply-add: results match torch's bits
    ldflags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs serially.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    ):
        # Vectorized half/bfloat16 casts (F16C) are ~5x faster. Flags are hashed into the build
        # directory's name, so a CPU without AVX2 looks elsewhere and never loads this library.
        cflags += ["-mavx2", "-mfma", "-mf16c"]
    return tuple(cflags), tuple(ldflags)


def sources(with_cuda: bool) -> list[Path]:
    """The translation units of a build, CUDA ones included when ``with_cuda``."""
    names = _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())
    root = source_dir()
    return [root / name for name in names]


def build_directory(with_cuda: bool | None = None) -> Path:
    """Where the extension is (or would be) built for this torch, Python, sources and flags.

    Args:
        with_cuda: include the CUDA kernels; None asks :func:`cuda_wanted`.
    """
    from torch.utils.cpp_extension import get_default_build_root

    with_cuda = cuda_wanted() if with_cuda is None else with_cuda
    digest = hashlib.sha256()
    cflags, ldflags = _host_flags()
    for part in (torch.__version__, sys.version, str(with_cuda), *cflags, *ldflags, *_CUDA_CFLAGS):
        digest.update(part.encode() + b"\0")
    sources_root = source_dir()
    for name in sorted(_CPU_SOURCES + _CUDA_SOURCES + _HEADERS):
        digest.update(name.encode() + b"\0" + (sources_root / name).read_bytes())
    device = "cuda" if with_cuda else "cpu"
    # The same root cpp_extension.load would use without an explicit build_directory.
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"{EXTENSION_NAME}-{device}-{digest.hexdigest()[:16]}"


def ops_registered() -> bool:
    """Whether ``torch.ops.whale.pack`` exists in this process (the extension is loaded)."""
    try:
        torch.ops.whale.pack  # noqa: B018 - the lookup is the test
    except (AttributeError, RuntimeError):
        return False
    return True


_python_module: ModuleType | None = None


def python_entry() -> Callable[..., bool] | None:
    """The loaded library's direct CPU entry ``_bucket`` (csrc/whale_ops_py.cpp), or None when the
    extension is not loaded in this process.

    ``_bucket(op, flat, tensors, shard_sizes, scale)`` runs op 0-3 (pack, unpack, pack_shards,
    unpack_shards) on plain CPU tensors without the dispatcher's per-tensor conversion, and
    returns False, nothing written, for any call it does not take (then use ``torch.ops.whale``).
    """
    return None if _python_module is None else _python_module._bucket


def _import_module(library: Path) -> None:
    """Import the library as a Python module too (the same dlopen handle as the ops' library)."""
    global _python_module
    if _python_module is not None:
        return
    loader = importlib.machinery.ExtensionFileLoader(EXTENSION_NAME, str(library))
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, str(library), loader=loader)
    if spec is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _python_module = module


def load_prebuilt() -> Path | None:
    """Load the extension from the build cache if it was built; never compiles.

    Returns:
        The loaded library, or None when this torch/sources/flags combination is not built (or
        the sources are not installed).

    Raises:
        RuntimeError: a cached library exists but does not load.
    """
    try:
        library = build_directory() / f"{EXTENSION_NAME}.so"
    except FileNotFoundError:
        return None
    if not library.is_file():
        return None
    # A second library registering the same namespace would abort the process.
    if not ops_registered():
        try:
            torch.ops.load_library(str(library))
        except OSError as error:
            raise RuntimeError(
                f"whale: the cached extension {library} does not load ({error}); rebuild it with "
                "`whale build-ext`, or set WHALE_DISABLE_EXT=1 to use the pure PyTorch path"
            ) from error
    _import_module(library)
    return library


def build(verbose: bool = False) -> Path:
    """Compile the extension into the cache (a no-op when it is up to date) and load it.

    Needs a C++ compiler and ninja; with :func:`cuda_wanted`, also nvcc. The first build takes
    seconds for CPU only (about 10 s on 2 cores), half a minute or so with CUDA.

    Args:
        verbose: print the compiler commands and output.

    Returns:
        The path of the loaded library.

    Raises:
        RuntimeError: the toolchain is missing, or compilation failed (torch's message).

    Example::

        path = build(verbose=True)
        torch.ops.whale.pack([torch.ones(3)], torch.empty(3), 0.5)
    """
    from torch.utils import cpp_extension

    with_cuda = cuda_wanted()
    directory = build_directory(with_cuda)
    if ops_registered():
        # Loaded already in this process (from this directory, unless TORCH_EXTENSIONS_DIR
        # changed since): a rebuilt library could not be loaded next to it.
        library = directory / f"{EXTENSION_NAME}.so"
        if library.is_file():
            _import_module(library)
        return library
    directory.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = _host_flags()
    with _ninja_on_path():
        if not cpp_extension.is_ninja_available():
            raise RuntimeError(
                "whale build-ext: building the extension needs ninja; `pip install ninja`"
            )
        library = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(path) for path in sources(with_cuda)],
            extra_cflags=list(cflags),
            extra_cuda_cflags=list(_CUDA_CFLAGS),
            extra_ldflags=list(ldflags),
            extra_include_paths=[str(source_dir())],
            build_directory=str(directory),
            verbose=verbose,
            with_cuda=with_cuda,
            is_python_module=False,
        )
    _import_module(Path(library))
    return Path(library)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put this interpreter's scripts directory on PATH for the build, then restore PATH.

    ``pip install ninja`` puts the binary there, which is not on PATH when the venv's python is
    run without activating the venv (as CI does); cpp_extension looks ninja up on PATH.
    """
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if not scripts or scripts in path.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = os.pathsep.join([path, scripts]) if path else scripts
    try:
        yield
    finally:
        os.environ["PATH"] = path
