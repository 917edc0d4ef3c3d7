"""What keeps `tunelab studio` to its user: the access token, the CSRF token, and the folders it may read.

- Bound to a loopback address, the studio serves this machine's user without a token (as Jupyter
  does with `--ip=127.0.0.1` and a token off). Bound to any other address, every request needs the
  token printed at start: `?token=...` once (then a cookie), or the header `Authorization: token ...`.
  A request from a non-loopback client needs it in either case.
- Every state-changing request (POST) carries the CSRF token, in the `X-CSRF-Token` header or the
  form field `csrf`; it is the value of a cookie the page set (double-submit), so another site's
  page cannot send it.
- Files are read only under the runs and data folders: a requested path is resolved (symlinks
  followed, `..` collapsed) and must stay inside its folder.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from pathlib import Path
from urllib.parse import unquote

TOKEN_COOKIE = "tunelab_studio_token"
CSRF_COOKIE = "tunelab_studio_csrf"
CSRF_HEADER = "x-csrf-token"


class Refused(Exception):
    """A request the studio refuses: answered with `status` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def is_loopback(host: str | None) -> bool:
    """Whether `host` (an address or `localhost`) is this machine only."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two secrets (None never matches)."""
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def token_needed(bound_host: str, client_host: str | None) -> bool:
    """A token is needed when the studio listens beyond this machine, or the client is not on it."""
    return not is_loopback(bound_host) or not is_loopback(client_host)


def presented_token(query: str | None, header: str | None, cookie: str | None) -> str | None:
    """The token a request shows: `?token=`, `Authorization: token X` (or `Bearer X`), or the cookie."""
    if query:
        return query
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer") and value:
            return value.strip()
    return cookie


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, resolved, when it stays inside `root`.

    Raises:
        Refused: 403 for an absolute path, a path that leaves `root` (`..`, a symlink out), or a
            NUL byte; the message names only what was asked for, never the folder's real path.
    """
    text = unquote(relative)  # a path may arrive encoded twice (%252e%252e); decoding again is harmless
    if "\x00" in text or Path(text).is_absolute() or text.startswith(("/", "\\")) or ":" in text[:3]:
        raise Refused(403, f"{relative}: only paths inside the studio's folders can be read")
    base = root.resolve()
    target = (base / text).resolve()
    if not target.is_relative_to(base):
        raise Refused(403, f"{relative}: only paths inside the studio's folders can be read")
    return target
