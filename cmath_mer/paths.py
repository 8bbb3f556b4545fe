"""Names that become part of a path the project writes (a sweep's recipe names, seed folders, cache files):
each must be one plain component of the folder the user named, so that nothing is written outside it."""
from __future__ import annotations

import re

from .errors import UsageError

# letters, digits and . _ - + = @ , (no separator, no leading dot or dash: no hidden file, no option lookalike)
_SAFE = re.compile(r"[A-Za-z0-9_+=@,][A-Za-z0-9._+=@,-]{0,127}")


def path_component(name, what: str) -> str:
    """`name` if it is a single safe path component, else UsageError naming `what` (e.g. "--grid G.json:
    recipe name") and the name. Call it before anything is written."""
    text = str(name)
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not _SAFE.fullmatch(text):
        raise UsageError(f"{what} {text!r}: not usable as a folder or file name (1-128 characters of letters, "
                         f"digits and . _ - + = @ , not starting with . or -; no / or ..)")
    return text
