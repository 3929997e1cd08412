"""One-line terminal warnings in place of what a library would print raw.

PIL warns about a very large image (`DecompressionBombWarning`) in two lines, without naming the file. The
CLI installs `install()` once; the readers wrap each file in `reading(path)`, so the line names it. The path
is kept per thread: the readers decode in thread pools and the warning is shown in the thread that raised it.
"""

from __future__ import annotations

import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_here = threading.local()
_BOMB = re.compile(r"Image size \((\d+) pixels\) exceeds limit of (\d+) pixels")


@contextmanager
def reading(path) -> Iterator[None]:
    """Name `path` in any warning raised while it is read in this thread."""
    previous = getattr(_here, "path", None)
    _here.path = path
    try:
        yield
    finally:
        _here.path = previous


def install() -> None:
    """Show PIL's large-image warning as one line naming the file (each file, not only the first)."""
    if getattr(warnings.showwarning, "_coreg", False):
        return
    warnings.filterwarnings("always", message=_BOMB.pattern)
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        m = _BOMB.search(str(message))
        if m and category.__name__ == "DecompressionBombWarning":
            from tqdm import tqdm

            path = getattr(_here, "path", None)
            if path is None:  # a reader that names no file (training's decoder): say it once, not per image
                if getattr(show, "_said", False):
                    return
                show._said = True
                path = "some images (listed by `coreg annotate`)"
            tqdm.write(  # above a running progress bar, not glued to it
                f"warning: {path}: a very large image ({int(m[1]):,} pixels, over PIL's safety limit of {int(m[2]):,}); "
                "decoding it takes much time and memory",
                file=sys.stderr,
            )
            return
        previous(message, category, filename, lineno, file, line)

    show._coreg = True
    warnings.showwarning = show
