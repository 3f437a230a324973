"""The compiled `_core` module (C++ trie search, streaming top-k, CUDA attention), imported loudly.

A package whose extension is missing or broken must not quietly serve with the slow Python paths:
`core()` raises an ImportError that names the build problem. Every recommendation path builds its trie
or top-k in C++, so nothing recommends without the extension; the plain Python references (tests) stay
importable.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def core():
    """-> genrec_fast._core; ImportError naming the problem when it cannot be imported."""
    try:
        from genrec_fast import _core
    except ImportError as e:
        raise ImportError(
            f"genrec_fast._core (the C++ extension) cannot be imported: {e}. The package was installed "
            "without a working build: reinstall it with `pip install .` from the source tree (it needs a C++17 "
            "compiler and CMake; see the build log). Recommending and training need it."
        ) from e
    missing = [name for name in ("Trie", "BeamSearch", "StreamingTopK", "leaf_scores") if not hasattr(_core, name)]
    if missing:
        raise ImportError(f"genrec_fast._core at {_core.__file__} is an old build without {missing}: "
                          "reinstall the package (`pip install .`)")
    return _core
