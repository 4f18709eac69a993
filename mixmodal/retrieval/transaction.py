"""The memory bank folder's write transaction: how `build`, `add` and `reindex` change the files
bank.py lists without a reader or a killed writer ever seeing a bank that is neither the old one
nor the new one (benchmarks/soak.py kills `index add` with SIGKILL at random moments and at each
step below):

  - `build` writes a sibling temporary folder and swaps it into place in one rename
    (renameat2 RENAME_EXCHANGE where the OS has it; else two renames, and a bank found moved
    aside is named in the error);
  - `add` and `reindex` take INDEX/write.lock (one writer at a time), append to the store,
    write every other changed file under a new name (NAME.add-tmp), then write commit.json
    listing them: that rename is the commit point. Then each file is moved into place, and
    commit.json removed. A reader that finds commit.json reads the new files (moved or not);
    one that does not reads the old ones and ignores the store's bytes past offsets.npy's end.
    The next writer finishes a committed write (moves the rest into place) or rolls back one
    that was not (cuts the store's tail, removes the temporaries), before its own.

A full disk or a read-only folder stops an add with one line (`disk_error`, `why`); nothing is
added and the bank stays as it was.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mixmodal.retrieval.errors import BankError, build_hint, rebuild_hint
from mixmodal.train import faults
from mixmodal.weights import sync_to_disk

FILES = ("bank.json", "index.faiss", "embeddings.npy", "keys.npy", "store/documents.jsonl", "store/offsets.npy")
REPLACED = ("embeddings.npy", "keys.npy", "store/offsets.npy", "index.faiss", "bank.json")  # by an add, in order
JOURNAL = "commit.json"  # an add's or a reindex's commit point: the files whose new versions replace them
NEW = ".add-tmp"  # FILE.add-tmp: FILE's new version, written before the commit
LOCK = "write.lock"  # flock-ed by the one process writing to the bank (add, reindex)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


# --- add and reindex: the commit journal, the lock, the disk ----------------------------------------

def _journal(path: Path) -> list[str] | None:
    """The files commit.json lists (None when there is none)."""
    file = path / JOURNAL
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BankError(f"{file} cannot be read ({e}): the record of an add's commit is damaged; {rebuild_hint(path)}"
                        ) from None
    names = data.get("files") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(n in FILES for n in names):
        raise BankError(f"{file} is not a commit record (a files list of the bank's files): the folder was damaged; "
                        f"{rebuild_hint(path)}")
    return names


def resolve(path: Path) -> tuple[dict[str, Path], bool]:
    """Where each of the bank's files is read from: its own name, or, while a committed write is moved into
    place (commit.json is there), its new version not yet moved. And whether one is."""
    files = {name: path / name for name in FILES}
    names = _journal(path)
    for name in names or ():
        new = path / f"{name}{NEW}"
        if new.is_file():
            files[name] = new
    return files, names is not None


def commit(path: Path, names: list[str]) -> None:
    """Write commit.json (atomically): from now on the new versions of `names` are the bank."""
    write_json(path / JOURNAL, {"files": names})
    sync_to_disk(path, [path / JOURNAL])
    faults.point("index:committed")


def finish_commit(path: Path) -> bool:
    """Move the new versions commit.json lists into place (those still there), then remove it. Whether there
    was one. Safe to repeat: a file already moved is not there any more."""
    names = _journal(path)
    if names is None:
        return False
    for name in names:
        new = path / f"{name}{NEW}"
        if new.is_file():
            os.replace(new, path / name)
            faults.point("index:replaced")
    sync_to_disk(path, [])
    (path / JOURNAL).unlink()
    return True


def temporaries(path: Path) -> list[Path]:
    """Leftovers of a write that did not commit: new versions, the raw embeddings, half-written JSON."""
    return [p for folder in (path, path / "store") for p in (folder.glob("*tmp") if folder.is_dir() else ())
            if p.is_file()]


def recover(path: Path, read_count: Callable[[Path], int]) -> bool:
    """Under the write lock: finish a committed write, or roll back one that was not (temporaries removed, the
    store's tail cut at offsets.npy's end). Whether there was anything to do. `read_count` gives bank.json's
    count (BankError when bank.json is damaged: bank.py's check)."""
    done = finish_commit(path)
    for p in temporaries(path):
        unlink_quietly(p)
        done = True
    store = path / "store" / "documents.jsonl"
    try:
        offsets = np.load(path / "store" / "offsets.npy", mmap_mode="r")
        count = read_count(path)
        end, size = int(offsets[-1]), store.stat().st_size
    except (OSError, ValueError, IndexError, EOFError, BankError):
        return done  # damaged: open() names it
    if size > end and offsets.shape == (count + 1,):  # (files that disagree otherwise: not an add's tail; refused)
        with open(store, "r+b") as f:
            f.truncate(end)
        done = True
    return done


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """INDEX/write.lock held exclusively (released by the OS however this process ends); BankError when
    another process holds it. No locking where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    if not path.is_dir():
        raise BankError(f"{path}: no such index folder; build one with {build_hint(path)}")
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BankError(f"another process is writing to {path} (it holds {path / LOCK}: an `index add` or a "
                            "reindex); wait for it to finish, then run this again") from None
        yield
    finally:
        os.close(fd)


def disk_error(e: BaseException, path: Path) -> bool:
    """A write into the bank folder refused by its disk (full, read-only, not ours): one line, not a traceback."""
    if not isinstance(e, OSError) or e.errno not in DISK_FULL:
        return False
    where = e.filename
    return where is None or (isinstance(where, (str, os.PathLike))
                             and os.path.abspath(where).startswith(os.path.abspath(path)))


def why(e: OSError) -> str:
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def unlink_quietly(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


def write_json(file: Path, data: dict) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)


# --- build: the folder swapped into place, what a stopped build left beside it ---------------------

def move_into_place(tmp: Path, out: Path, swap: Callable[[Path, Path], bool] | None = None) -> None:
    """Put the finished `tmp` at `out`: one atomic swap with an old `out` where the OS can (the old one, then
    under tmp's name, is removed after), else the old one moved aside first and removed last. `swap` is
    `exchange` unless given (bank.py passes its own name for it: the seam tests make the swap fail through)."""
    swap = exchange if swap is None else swap
    if not out.exists():
        os.replace(tmp, out)
    elif swap(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    sync_to_disk(out.parent, [])


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the OS, its C library
    or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _siblings(out: Path) -> list[tuple[Path, int | None]]:
    """Folders a build of `out` left beside it (NAME.tmp-PID-*, NAME.old-PID-*) with the pid that wrote them."""
    found = []
    for p in out.parent.glob(f"{glob.escape(out.name)}.[to][ml][pd]-*") if out.parent.is_dir() else ():
        kind, _, rest = p.name[len(out.name) + 1:].partition("-")
        if kind in ("tmp", "old") and p.is_dir():
            pid = rest.split("-")[0]
            found.append((p, int(pid) if pid.isdigit() else None))
    return found


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def moved_aside(out: Path) -> str | None:
    """The fix when `out` is missing because a build stopped between its two renames (no RENAME_EXCHANGE)."""
    old = [p for p, _ in _siblings(out) if p.name.startswith(f"{out.name}.old-") and (p / "bank.json").is_file()]
    if not old:
        return None
    return (f"a build replacing it was stopped after moving the old bank aside: put it back with `mv {old[0]} "
            f"{out}`, or build again")


def tidy_siblings(out: Path) -> None:
    """Before a build: a bank a stopped build moved aside goes back to `out` (the build then replaces it as
    usual); what stopped builds left beside `out` is removed (not a running build's folder)."""
    for p, pid in _siblings(out):
        if _alive(pid) and pid != os.getpid():
            continue
        if p.name.startswith(f"{out.name}.old-") and not out.exists() and (p / "bank.json").is_file():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)
