"""Save a model without ever leaving a half-written checkpoint: write a temporary folder, then rename it.

transformers' `save_pretrained` writes into the target folder in place, so a failure halfway (a full disk,
an interrupt) destroys the checkpoint already there, and a failed sharded save can leave a new config beside
old weights. `save_pretrained(model, path)` writes beside `path` and renames only once everything is written.
A save killed on the way leaves folders beside `path` (`.NAME.partial-PID-*`, `.NAME.old-PID-*`); the next
save into `path` puts the previous checkpoint back from them, or clears them (`recover`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `target`; rename it to `target` only when the block succeeds.

    An existing `target` is refused unless `overwrite`, and then replaced as a whole (files that are not
    part of the new save are not kept) only after the new folder is complete."""
    target = Path(target)
    recover(target)
    if target.exists() and (target.is_file() or not overwrite):
        raise FileExistsError(f"{target} already exists: choose another folder or pass overwrite=True "
                              "(the whole folder is then replaced once the new one is fully written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(folder: Path, target: Path) -> None:
    """Rename `folder` to `target`; an existing `target` is first moved aside under a name no other save uses,
    put back if the second rename fails, and removed once the new folder is in place."""
    if not target.exists():
        os.replace(folder, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(target, old)
    try:
        os.replace(folder, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover(target: str | os.PathLike) -> None:
    """Undo what a killed save into `target` left beside it. Killed between its two renames, an overwrite left
    the previous checkpoint whole in `.NAME.old-*` and nothing at `target`: it goes back to `target`. Backups
    left while `target` exists are stale (killed after the second rename) and are removed, and so are the
    temporary folders of saves whose process is gone."""
    target = Path(target)
    backups = sorted(_beside(target, "old"), key=lambda folder: folder.stat().st_mtime)
    if backups and not target.exists():
        os.replace(backups.pop(), target)  # the newest: older ones were already replaced by an overwrite
    for folder in backups:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in _beside(target, "partial"):
        if not _written_by_another_process(folder):
            shutil.rmtree(folder, ignore_errors=True)


def interrupted_backup(target: str | os.PathLike) -> Path | None:
    """The previous checkpoint that a save killed between its renames left beside a missing `target`, if any."""
    target = Path(target)
    backups = [] if target.exists() else _beside(target, "old")
    return max(backups, key=lambda folder: folder.stat().st_mtime) if backups else None


def _beside(target: Path, kind: str) -> list[Path]:
    """The folders named `.NAME.<kind>-*` beside `target`."""
    return [p for p in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*") if p.is_dir()]


def _written_by_another_process(folder: Path) -> bool:
    """True when a temporary folder may still be written: its name holds the id of a running process other than
    this one (saves into one folder from two threads of a process are not supported). A folder without an id
    (written by an older version) or on a system where that cannot be checked is kept."""
    found = re.search(r"\.partial-(\d+)-", folder.name)
    if found is None or os.name != "posix":
        return True
    pid = int(found.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def save_pretrained(model, path: str | os.PathLike, tokenizer=None, overwrite: bool = False, **kwargs) -> Path:
    """`model.save_pretrained(path, **kwargs)` (and the tokenizer's), all or nothing; returns the folder.

    If anything fails, `path` is left as it was (absent, or the previous checkpoint when `overwrite`)."""
    with atomic_folder(path, overwrite) as folder:
        model.save_pretrained(folder, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return Path(path)
