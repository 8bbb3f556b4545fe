"""Unpickling files from elsewhere without running them: a pickle names the functions it calls, and this
unpickler allows only the few numpy and builtin constructors a feature pickle needs (ALLOWED_GLOBALS), bounds
the sizes they may build, and checks the structure's depth and element count before anyone walks it. A
hostile pickle is an UnsafePickleError naming the file and the global it asked for, before anything runs."""
from __future__ import annotations

import _compat_pickle
import builtins
import importlib
import io
import pickle
from pathlib import Path

import numpy as np

from .dataset import DataError
from .memory import available_bytes

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTIN_GLOBALS = {("builtins", n) for n in ("set", "frozenset", "list", "dict", "tuple", "slice", "complex",
                                               "bytearray", "bytes", "str", "int", "float", "bool", "range")}
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    _NUMPY_GLOBALS | _BUILTIN_GLOBALS
    | {("collections", "OrderedDict"), ("collections", "defaultdict"),
       ("_codecs", "encode")})       # Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
# numpy 2 moved numpy.core to numpy._core; pickles written by numpy 1 name the old module.
_NUMPY_RENAMES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}


class UnsafePickleError(DataError):
    """A pickle asked for a global outside ALLOWED_GLOBALS; nothing from it was run."""


_SIZED_BUILTINS = {("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "range")}
MAX_BUILT_SIZE = 1 << 28          # bytes(n), bytearray(n), range(...): a 10-byte pickle could ask for terabytes


def _bounded(source: str, name: str):
    """bytes / bytearray / range as a pickle calls them, refusing sizes no feature file needs."""
    real = getattr(builtins, name)

    def call(*args):
        size = None
        if name == "range":
            size = len(range(*args))
        elif args and isinstance(args[0], int):
            size = args[0]
        if size is not None and size > MAX_BUILT_SIZE:
            raise UnsafePickleError(f"{source}: refused: the pickle asks for {name}() of {size} elements "
                                    f"(at most {MAX_BUILT_SIZE})")
        return real(*args)
    return call


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays, numpy scalars and builtin containers; any other global is refused
    before it is imported, so a hostile pickle cannot run code (os.system, eval, ...) while it loads."""

    def __init__(self, file, *, source: str = "<pickle>", **kwargs):
        kwargs.setdefault("encoding", "latin1")       # Python 2 (IEMOCAP) pickles; harmless for others
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        key = (module, name)
        if (module, name) in _compat_pickle.NAME_MAPPING:            # Python 2 names (__builtin__.set, ...)
            key = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            key = (_compat_pickle.IMPORT_MAPPING[module], name)
        if key not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refused to load global '{module}.{name}' from the pickle: peer feature files "
                f"hold only numpy arrays and builtin containers, and loading anything else could run code. "
                f"Nothing from the file was executed. If you trust the file, convert it in a trusted "
                f"environment to numpy arrays/dicts first")
        mod, attr = key
        if key in _SIZED_BUILTINS:
            return _bounded(self.source, attr)
        if mod in _NUMPY_RENAMES:
            try:
                return getattr(importlib.import_module(_NUMPY_RENAMES[mod]), attr)
            except (ImportError, AttributeError):
                pass
        return super().find_class(mod, attr)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused persistent id {pid!r} in the pickle")


# Bounds on the structure of an unpickled object, checked before any work on it. Pickle memoizes objects, so
# a few KB can describe a list that holds itself, or nested lists whose every level holds the one below
# twice (2^depth elements once walked); peer files are tuples of dicts of lists of arrays.
MAX_DEPTH = 32
MAX_ELEMENTS_PER_BYTE = 4           # elements reached when walking, per byte of the file (plus a constant)


def check_structure(obj, source: str, file_size: int, available: int | None = None) -> None:
    """Refuse (DataError) self-referencing containers, nesting deeper than MAX_DEPTH, a walk over more
    elements than the file could hold without sharing (exponential memo tricks), and arrays that, read as
    the loader copies them (once per reference: one array shared by many fields of a small file), need more
    memory than is `available` (default: what the machine has available). Linear in the objects."""
    limit = MAX_ELEMENTS_PER_BYTE * file_size + 1_000_000
    sizes: dict[int, int] = {}           # id -> elements reached from it (its subtree, walked)
    nbytes: dict[int, int] = {}          # id -> bytes of the arrays reached from it, once per reference
    depths: dict[int, int] = {}
    active: set[int] = set()
    keep = []                            # keep ids valid during the walk

    def children(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield v
        elif isinstance(x, (list, tuple, set, frozenset)):
            yield from x

    stack = [(obj, False)]
    while stack:
        x, done = stack.pop()
        if not isinstance(x, (dict, list, tuple, set, frozenset)):
            continue
        i = id(x)
        if done:
            size, depth, arrays = 1, 1, 0
            for c in children(x):
                if isinstance(c, (dict, list, tuple, set, frozenset)):
                    size += sizes[id(c)]
                    depth = max(depth, depths[id(c)] + 1)
                    arrays += nbytes[id(c)]
                else:
                    size += 1
                    arrays += c.nbytes if isinstance(c, np.ndarray) else 0
            nbytes[i] = arrays
            active.discard(i)
            sizes[i], depths[i] = size, depth
            if depth > MAX_DEPTH:
                raise DataError(f"{source}: refused: containers nested {depth} deep (peer feature files nest a "
                                f"few levels; at most {MAX_DEPTH} are read)")
            if size > limit:
                raise DataError(f"{source}: refused: the pickle's containers reach {size} elements through shared "
                                f"references, far more than a {file_size}-byte file holds (a decompression bomb?)")
            continue
        if i in sizes:
            continue
        if i in active:
            raise DataError(f"{source}: refused: a container in the pickle holds itself (a self-referencing "
                            f"structure is not feature data)")
        if len(active) > MAX_DEPTH:
            raise DataError(f"{source}: refused: containers nested more than {MAX_DEPTH} deep")
        active.add(i)
        keep.append(x)
        stack.append((x, True))
        for c in children(x):
            if isinstance(c, (dict, list, tuple, set, frozenset)):
                if id(c) in active:
                    raise DataError(f"{source}: refused: a container in the pickle holds itself (a "
                                    f"self-referencing structure is not feature data)")
                if id(c) not in sizes:
                    stack.append((c, False))
    need = nbytes.get(id(obj), obj.nbytes if isinstance(obj, np.ndarray) else 0)
    have = available_bytes() if available is None else available
    if need > have // 2:
        raise DataError(f"{source}: refused: its arrays, read once per reference (the pickle shares them between "
                        f"fields), need about {need / 2**30:,.1f} GiB of memory, more than half the "
                        f"{have / 2**30:,.1f} GiB available")


def safe_load_pickle(path: str | Path):
    """Load a pickle with SafeUnpickler (encoding latin1) and check_structure. Raises DataError
    (UnsafePickleError for a refused global) naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, source=str(path)).load()
            size = f.tell()
        check_structure(obj, str(path), size)
        return obj
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as err:        # truncated or not a pickle: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err


def safe_loads(data: bytes, source: str = "<bytes>"):
    """SafeUnpickler on bytes in memory."""
    return SafeUnpickler(io.BytesIO(data), source=source).load()
