"""Save a model without ever leaving a half-written checkpoint: write a temporary folder, then rename it.

transformers' `save_pretrained` writes into the target folder in place, so a failure halfway (a full disk,
an interrupt) destroys the checkpoint already there, and a failed sharded save can leave a new config beside
old weights. `save_pretrained(model, path)` writes beside `path` and renames only once everything is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `target`; rename it to `target` only when the block succeeds.

    An existing `target` is refused unless `overwrite`, and then replaced as a whole (files that are not
    part of the new save are not kept) only after the new folder is complete."""
    target = Path(target)
    if target.exists() and (target.is_file() or not overwrite):
        raise FileExistsError(f"{target} already exists: choose another folder or pass overwrite=True "
                              "(the whole folder is then replaced once the new one is fully written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model, path: str | os.PathLike, tokenizer=None, overwrite: bool = False, **kwargs) -> Path:
    """`model.save_pretrained(path, **kwargs)` (and the tokenizer's), all or nothing; returns the folder.

    If anything fails, `path` is left as it was (absent, or the previous checkpoint when `overwrite`)."""
    with atomic_folder(path, overwrite) as folder:
        model.save_pretrained(folder, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return Path(path)
