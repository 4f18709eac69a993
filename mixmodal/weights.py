"""Files of weights: reading a safetensors file, every loader's one way in: memory-mapped, and a damaged or
foreign file is one line naming it and what to do, never a library traceback.

Manifests (issue 22): every folder mixmodal writes for another program to load (a training checkpoint,
RUN/model, a converted folder, an image tokenizer, a text tokenizer, a dual encoder) ends with

    manifest.json   {"files": {relative path: {"size": bytes, "sha256": hex}}, "remake": "how to write it again"}

written last, after every other file, so a folder cut short or damaged later fails its manifest. The
rule a loader follows (`checked_folder`):

  - sizes of every listed file, always; a listed file that is missing is an error naming it;
  - the SHA-256 of every listed file up to HASH_AT_LOAD (64 MiB: configs, tokenizers, vocabulary maps,
    small models), always: milliseconds;
  - the SHA-256 of larger files (the weights of a big model: 14 GB of a 7B takes tens of seconds) only
    when reading the folder fails anyway (then a changed file is the reason given), or when asked:
    `verify_folder(path)` hashes everything.

A folder without manifest.json (written before manifests existed, or by hand) loads unchecked; files
the manifest does not list (added later) are not checked. generation.yaml is never listed: its
settings are meant to be edited (model/bundle.py). The memory bank keeps its own consistency
check instead (retrieval/transaction.py: `index add` appends in place and commit.json is its commit point).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import torch

MANIFEST = "manifest.json"
HASH_AT_LOAD = 64 * 2**20  # files up to this size are hashed at every load; larger ones when asked or on failure
UNLISTED = ("generation.yaml",)  # settings meant to be edited by hand: never in a manifest


def sync_to_disk(folder: Path, files: Iterable[Path]) -> None:
    """Flush `files` and `folder`'s entries to disk (against power loss; a SIGKILL needs none of it). Best
    effort: not every OS or file system allows it, and a file that cannot be flushed does not stop the rest."""
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks (checkpoint manifests, the FID Inception weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class WeightsFileError(ValueError):
    """A weights file that cannot be read; the message names it and the fix."""


class ManifestError(WeightsFileError):
    """A folder whose files disagree with its manifest.json; one line naming the file, what is wrong, the fix."""


def read_weights(path: str | Path, fix: str = "re-save it, or resume or export from an earlier checkpoint"
                 ) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (memory-mapped: nothing is copied until used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes): the save was cut short; {fix}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsFileError(f"{path} is not a readable safetensors file ({size} bytes; {e}): it is truncated or "
                               f"not weights; {fix}") from None


# --- manifests ----------------------------------------------------------------------------

def write_manifest(folder: str | os.PathLike, files: Iterable[str] | None = None, *,
                   remake: str | None = None) -> Path:
    """folder/manifest.json: size and SHA-256 of `files` (paths relative to `folder`; default every file
    under it, subfolders included, but manifest.json itself and UNLISTED), written last and atomically.
    `remake` says how to write the folder again (a loader's error repeats it); None keeps the one an
    earlier manifest of the folder gave, so rewriting the manifest after a deliberate edit keeps it."""
    folder = Path(folder)
    if files is None:
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and p.relative_to(folder).as_posix() not in (MANIFEST, MANIFEST + ".tmp")
                       and p.name not in UNLISTED)
    if remake is None:
        try:
            remake = (read_manifest(folder) or {}).get("remake")
        except ManifestError:
            remake = None
    data: dict = {"files": {name: _entry(folder, name) for name in files}}
    if remake:
        data["remake"] = str(remake)
    return _write(folder, data)


def _entry(folder: Path, name: str) -> dict:
    return {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}


def _write(folder: Path, data: dict) -> Path:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def refresh_manifest(folder: str | os.PathLike, under: str) -> None:
    """Re-list the files under the subfolder `under` in folder's manifest (they were replaced on purpose:
    `mixmodal convert chameleon-vqgan` into a converted model's image_tokenizer/), keeping every other entry
    as it is, unhashed again. Nothing to do for a folder without a manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    prefix = PurePosixPath(under).as_posix().rstrip("/") + "/"
    kept = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
    new = sorted(p.relative_to(folder).as_posix() for p in (folder / under).rglob("*") if p.is_file())
    table = {**kept, **{name: _entry(folder, name) for name in new}}
    _write(folder, {**manifest, "files": dict(sorted(table.items()))})


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """folder/manifest.json ({"files": {...}, "remake"?}), None when there is none; ManifestError when it is
    not one (not JSON, no files table, a listed path outside the folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        ok = isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            and _inside(k) for k, v in files.items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path} is not readable ({type(e).__name__}: {str(e)[:80]}): the folder was damaged")
    if not ok:
        raise ManifestError(f"{path} is not a manifest (a files table of sizes and SHA-256s of files in the folder)")
    return data


def _inside(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def manifest_problems(folder: str | os.PathLike, *, hash_limit: int | None = None,
                      only: Iterable[str] | None = None, manifest: dict | None = None) -> list[tuple[str, str]]:
    """[(file, what is wrong)] of `folder` against its manifest ([] when it agrees or has none): sizes of
    every listed file (or of `only` those), SHA-256 of those up to `hash_limit` bytes (None: all)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        return []
    files = manifest["files"]
    names = [n for n in only if n in files] if only is not None else list(files)
    problems = []
    for name in names:
        want, f = files[name], folder / name
        if not f.is_file():
            problems.append((name, "is missing"))
        elif (size := f.stat().st_size) != want["size"]:
            problems.append((name, f"has {size} bytes, the manifest says {want['size']}"))
        elif (hash_limit is None or size <= hash_limit) and file_sha256(f) != want["sha256"]:
            problems.append((name, "does not match its SHA-256 in the manifest"))
    return problems


def _fail(folder: Path, problems: list[tuple[str, str]], manifest: dict | None, fix: str) -> ManifestError:
    name, what = problems[0]
    more = ""
    if len(problems) > 1:
        others = [n for n, _ in problems[1:]]
        more = f" (and {len(others)} more: {', '.join(others[:4])}{', ...' if len(others) > 4 else ''})"
    how = "damaged, cut short or changed" if "missing" not in what else "incomplete: damaged or files removed"
    remake = (manifest or {}).get("remake")
    return ManifestError(f"{folder / name} {what} ({folder / MANIFEST}){more}: the folder is {how} since it was "
                         f"written; {fix}" + (f", or {remake}" if remake and remake not in fix else ""))


def check_folder(folder: str | os.PathLike, fix: str, *, full: bool = False,
                 only: Iterable[str] | None = None) -> bool:
    """The load-time check (the module docstring's rule; `full`: every file hashed): ManifestError naming the
    first problem and `fix` (plus the manifest's own `remake`). Returns whether the folder has a manifest."""
    folder = Path(folder)
    hash_limit = None if full else HASH_AT_LOAD
    try:
        manifest = read_manifest(folder)
    except ManifestError as e:
        raise ManifestError(f"{e}; {fix}") from None
    problems = manifest_problems(folder, hash_limit=hash_limit, only=only, manifest=manifest)
    if problems:
        raise _fail(folder, problems, manifest, fix)
    return manifest is not None


def verify_folder(folder: str | os.PathLike, fix: str = "copy the folder again from where it came from") -> bool:
    """Every file the folder's manifest lists, sizes and SHA-256 (large weights included): ManifestError on
    the first problem; True when intact, False when the folder has no manifest."""
    return check_folder(folder, fix, full=True)


@contextmanager
def checked_folder(folder: str | os.PathLike, fix: str, *, only: Iterable[str] | None = None) -> Iterator[None]:
    """A loader's frame: the load-time check first; if the loading inside then fails, every listed file
    is hashed, and a file changed since the folder was written is the error raised (ManifestError) instead
    of the loader's own."""
    only = list(only) if only is not None else None
    has_manifest = check_folder(folder, fix, only=only)
    try:
        yield
    except (ValueError, OSError, EOFError, KeyError):  # what a damaged file raises (not out-of-memory, not ^C)
        if has_manifest:
            problems = manifest_problems(folder, only=only)
            if problems:
                raise _fail(Path(folder), problems, read_manifest(folder), fix) from None
        raise


__all__ = ["HASH_AT_LOAD", "MANIFEST", "ManifestError", "WeightsFileError", "check_folder", "checked_folder",
           "file_sha256", "manifest_problems", "read_manifest", "read_weights", "refresh_manifest", "verify_folder",
           "write_manifest"]
