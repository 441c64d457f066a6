"""Secrets never reach a file or a message: the password of a URL (``postgresql://user:PASSWORD@host/db``, a
sweep's ``--storage``) is replaced by ``***`` wherever treebench records a command line (manifest.json
``host.argv``, the lock file's ``command``) or prints one."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: ``scheme://user:password@`` inside any text; the password is everything up to the last ``@`` of the
#: authority (a password may hold ``@`` unescaped in what users type), never a ``/`` or whitespace
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<password>[^\s/]*)(?P<at>@)(?=[^\s@/]*(?:[/\s?#]|$))")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['head']}***{m['at']}", text)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the passwords of its URLs replaced (``--storage=URL`` and ``--storage URL`` alike)."""
    return [redact(str(a)) for a in argv]
