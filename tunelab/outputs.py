"""Where tunelab writes: the checks that keep it from touching what it did not create.

- Every run folder, finished or unfinished, holds a small marker file, `.tunelab-run`.
  `--overwrite` replaces a folder only when it is a run (the marker, or for runs written before
  the marker existed, a finished run's own files: config.yaml, env.json, eval.json and model/),
  and refuses anything else, naming the files it would have touched.
- A replaced run is swapped out only once the new one has finished (`move_into_place`): the
  old run is renamed aside, the new one renamed in, then the old one removed; a failed re-run
  leaves the old run as it was.
- Before any expensive work, the place an output will be created is checked: no file in the
  way, and a folder tunelab can create things in (`check_writable`), so a read-only file
  system, a path under a file or under /proc fails at once with one line.

Hand-written because it is policy (what counts as a run, what a message says), not a file
operation a library offers.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import TunelabError

MARKER = ".tunelab-run"  # in every run folder tunelab writes, finished or not
COMPARE_MARKER = ".tunelab-compare"  # in every `tunelab compare` folder
# the names tunelab itself writes at the top of a run folder (prefixes end with "-" or ".")
RUN_NAMES = (MARKER, "config.yaml", "metrics.jsonl", "env.json", "model", "eval.json", "checkpoints",
             "encoder", "tensorboard", "trackers.json", "samples", "samples-", "samples.", "eval-",
             ".encoder.partial-",
             # left by a crash mid-write: files written whole then renamed, folders renamed aside to delete
             ".config.yaml.", ".env.json.", ".metrics.jsonl.", ".eval.json.", ".old-")  # fmt: skip
SHOWN = 8  # file names a refusal lists at most


def mark_run(folder: Path, marker: str = MARKER) -> None:
    """Mark `folder` as written by tunelab, so that `--overwrite` may later replace it."""
    (folder / marker).write_text("written by tunelab: `tunelab train --overwrite` may replace this folder\n")


def is_run(folder: Path) -> bool:
    """Whether `folder` is a tunelab run folder (finished or not)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if (folder / MARKER).is_file():
        return True
    # runs written before the marker existed: a finished run's own files, or an unfinished one's
    # config under the hidden `.<name>.partial` name tunelab gives it
    own = ("config.yaml", "env.json", "eval.json")
    if all((folder / name).is_file() for name in own) and (folder / "model").is_dir():
        return True
    return (
        folder.name.startswith(".")
        and folder.name.endswith(".partial")
        and (folder / "config.yaml").is_file()
    )


def _listing(folder: Path, names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN]) + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")
    return shown or "(nothing)"


def foreign_names(folder: Path) -> list[str]:
    """The top-level names in a run folder that tunelab does not write (the user's own files)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if not any(p.name == n or (n[-1] in "-." and p.name.startswith(n)) for n in RUN_NAMES)
    )


def check_replaceable(folder: Path, what: str = "--overwrite") -> None:
    """Raise unless `folder` may be replaced: it is missing, empty, or a tunelab run holding
    only tunelab's own files.

    Raises:
        TunelabError: naming the files that replacing the folder would have removed.
    """
    if folder.is_symlink():
        raise TunelabError(f"{what}: {folder} is a symbolic link, not a run folder tunelab wrote; nothing was "
                           f"removed: choose another output_dir")  # fmt: skip
    if not folder.exists():
        return
    if not folder.is_dir():
        raise TunelabError(f"{what}: {folder} is a file, not a run folder; nothing was removed: choose another "
                           f"output_dir")  # fmt: skip
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    if not is_run(folder):
        raise TunelabError(f"{what} only replaces a tunelab run, and {folder} is not one (no {MARKER}); it holds "
                           f"{_listing(folder, names)}; nothing was removed: choose another output_dir")  # fmt: skip
    foreign = foreign_names(folder)
    if foreign:
        raise TunelabError(f"{what}: the run {folder} also holds files tunelab did not write: "
                           f"{_listing(folder, foreign)}; nothing was removed: move them out, or choose another "
                           f"output_dir")  # fmt: skip


def move_into_place(new: Path, out: Path) -> None:
    """Rename the finished folder `new` to `out`. A run already at `out` (checked again: it may
    have changed meanwhile) is renamed aside first and removed only once `new` is in place;
    should the rename fail, it is put back.

    Raises:
        TunelabError: something other than a tunelab run is at `out` (`new` is kept).
    """
    if not out.exists() and not out.is_symlink():
        new.rename(out)
        return
    try:
        check_replaceable(out, "replacing the previous run")
    except TunelabError as e:
        raise TunelabError(f"{e}; the new run is kept at {new}") from None
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_writable(target: Path, what: str) -> None:
    """Raise unless the folder `target` can be created (or written, when it exists): no file in
    the way, and its nearest existing folder accepts new entries. `what` names the setting in
    messages, e.g. "output_dir runs/x".

    Raises:
        TunelabError: naming the file in the way, or the folder that cannot be written and why.
    """
    if target.exists() and not target.is_dir():
        raise TunelabError(f"{what}: {target} is a file, not a folder; choose a folder path")
    place = target
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise TunelabError(
            f"{what}: cannot create {target}: {place} is a file, not a folder; choose another path"
        )
    resolved = place.resolve()
    if any(p in (Path("/proc"), Path("/sys")) for p in (resolved, *resolved.parents)):
        raise TunelabError(f"{what}: {place} is a kernel interface (/proc, /sys), not a place for files; "
                           f"choose another path")  # fmt: skip
    try:  # the only sure test: os.access says yes to root on a read-only file system's folders
        probe = tempfile.mkdtemp(prefix=".tunelab-probe-", dir=place)
    except OSError as e:
        reason = "the file system is read-only" if e.errno == errno.EROFS else (e.strerror or str(e)).lower()
        raise TunelabError(f"{what}: cannot create {target}: {place} is not writable ({reason}); "
                           f"choose a writable folder") from None  # fmt: skip
    os.rmdir(probe)


def check_output_file(path: Path, flag: str) -> None:
    """Raise unless the file `path` can be written: its folder exists and takes new files, and
    `path` is not a folder. Checked before the work whose result it holds.

    Raises:
        TunelabError: naming the flag, the path and the fix.
    """
    if path.is_dir():
        raise TunelabError(f"{flag}: {path} is a folder; give a file name, e.g. {path / 'predictions.jsonl'}")
    if not path.parent.is_dir():
        place = path.parent
        while not place.exists() and place != place.parent:
            place = place.parent
        if place.exists() and not place.is_dir():
            raise TunelabError(
                f"{flag}: cannot write {path}: {place} is a file, not a folder; choose another path"
            )
        raise TunelabError(f"{flag}: the folder {path.parent} does not exist; create it first "
                           f"(mkdir -p {path.parent}) or choose another path")  # fmt: skip
    check_writable(path.parent, flag)


def check_new_file(path: Path, flag: str) -> None:
    """`check_output_file`, and `path` must not exist yet: tunelab never replaces a file it cannot
    tell it wrote.

    Raises:
        TunelabError: naming the flag, the path and the fix.
    """
    if path.is_file() or path.is_symlink():
        raise TunelabError(f"{flag}: {path} already exists; choose another name or remove it first "
                           f"(tunelab does not replace a file it did not write)")  # fmt: skip
    check_output_file(path, flag)


def write_new(path: Path, write: Callable[[Path], object]) -> None:
    """Have `write` fill a temporary file beside `path`, then rename it to `path`: a reader never
    sees half a file, and a failed write leaves nothing behind."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_disk_full(error: BaseException) -> bool:
    """Whether an error (an OSError, or safetensors' SafetensorError) means the disk is full."""
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text


def write_error(error: BaseException, where: Path) -> TunelabError | None:
    """A one-line TunelabError for an error writing under `where` that the user can fix (a full
    disk, a read-only file system, no permission), or None for anything else (a bug)."""
    code = getattr(error, "errno", None)
    if is_disk_full(error):
        return TunelabError(
            f"no space left on the device while writing {where}; free some space and run again"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return TunelabError(f"cannot write {where}: {os.strerror(code).lower()}; choose a writable folder")
    return None
