"""`mixmodal verify PATH`: every folder under PATH that mixmodal can check, checked in full (docs/reliability.md).

A folder with a manifest.json (a model folder, RUN/model, a checkpoint, a tokenizer, a dual encoder, a
converted folder) has every listed file's size and SHA-256 checked, whatever its size (loading hashes only
files up to 64 MiB: mixmodal/weights.py). A memory bank (bank.json) has its files checked to agree and every
document of its store read back. One line per folder: `ok`, or `DAMAGED` with the file, what is wrong and the
fix; exit status 1 when anything is damaged, or when nothing under PATH could be checked.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from mixmodal.cli.common import no_overrides



def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("verify", help="check folders against their manifests, every file hashed",
                         description="Check PATH and every folder under it that mixmodal wrote: a model folder, a run "
                         "folder (RUN/model, its tokenizers and every checkpoint), a tokenizer, a dual encoder, a "
                         "converted folder (each against its manifest.json: sizes and the SHA-256 of every file, "
                         "large weights included), a memory bank (its files agree, every stored document reads "
                         "back). Prints one line per folder, ok or what is wrong and what to do; exit status 1 when "
                         "anything is damaged.")
    p.add_argument("path", metavar="PATH", help="folder to check (searched recursively)")
    p.set_defaults(func=cmd_verify)


@dataclass
class Finding:
    folder: Path
    status: str  # ok | DAMAGED | note
    detail: str

    def line(self) -> str:
        return f"{self.status:<8} {self.folder}: {self.detail}" if self.detail else f"{self.status:<8} {self.folder}"


def cmd_verify(args: argparse.Namespace, overrides: list[str]) -> int:
    no_overrides("verify", overrides)
    findings = verify_path(args.path)
    for finding in findings:
        print(finding.line(), flush=True)
    damaged = sum(f.status == "DAMAGED" for f in findings)
    checked = sum(f.status in ("ok", "DAMAGED") for f in findings)
    if not checked:
        print(f"nothing verified under {args.path}: no manifest.json, memory bank or checkpoint there (a folder "
              "written before manifests, or not one mixmodal wrote)")
        return 1
    print(f"{checked} folder(s) checked: {'all intact' if not damaged else f'{damaged} damaged'}")
    return 1 if damaged else 0


def verify_path(path: str | os.PathLike) -> list[Finding]:
    """One Finding per folder under `path` that can be checked (or that is worth a note), in walking order."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise ValueError(f"{root} is a file: pass the folder it is in (its manifest.json lists it)")
    findings: list[Finding] = []
    intact: set[Path] = set()  # checkpoints found intact so far (oldest first): a damaged one's fix names one
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders.sort()
        if "bank.json" in files:
            findings.append(_bank(here))
            subfolders[:] = []  # store/images: the bank's own
            continue
        # leftovers of interrupted writes and quarantined checkpoints: not part of what loads
        skipped = [s for s in subfolders if s.startswith((".tmp-", ".old-", "damaged-")) or ".tmp-" in s]
        for name in skipped:
            if name.startswith("damaged-"):
                findings.append(Finding(here / name, "note", "set aside by a resume that found it damaged; not "
                                        "checked (delete it when no longer wanted)"))
        subfolders[:] = [s for s in subfolders if s not in skipped]
        if "manifest.json" in files:
            findings.append(_manifest(here, intact))
        elif _is_checkpoint(here):
            findings.append(_old_checkpoint(here, intact))
        elif "tokenizer.json" in files or "config.yaml" in files and "model.safetensors" in files:
            findings.append(Finding(here, "note", "no manifest.json (written before manifests, or by hand): not "
                                    "checked"))
        if findings and findings[-1].folder == here and findings[-1].status == "ok":
            intact.add(here)
    return findings


def _manifest(folder: Path, intact: set[Path]) -> Finding:
    from mixmodal import weights

    try:
        manifest = weights.read_manifest(folder)
        problems = weights.manifest_problems(folder, hash_limit=None, manifest=manifest)
    except weights.ManifestError as e:
        return Finding(folder, "DAMAGED", f"{e}; {_fix(folder, None, intact)}")
    except OSError as e:
        return Finding(folder, "DAMAGED", f"cannot be read ({e.strerror or e}: {e.filename}); "
                       f"{_fix(folder, None, intact)}")
    listed = manifest["files"]
    if not problems:
        size = sum(entry["size"] for entry in listed.values())
        return Finding(folder, "ok", f"{len(listed)} files, {_bytes(size)} hashed")
    name, what = problems[0]
    more = ""
    if len(problems) > 1:
        others = [n for n, _ in problems[1:]]
        more = f" (and {len(others)} more: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return Finding(folder, "DAMAGED", f"{folder / name} {what}{more}; {_fix(folder, manifest, intact)}")


def _old_checkpoint(folder: Path, intact: set[Path]) -> Finding:
    from mixmodal.train.checkpoint import verify_checkpoint

    problems = verify_checkpoint(folder)
    if problems:
        return Finding(folder, "DAMAGED", f"{'; '.join(problems)}; {_fix(folder, None, intact)}")
    return Finding(folder, "ok", "no manifest (written before manifests): its files are there, not hashed")


def _fix(folder: Path, manifest: dict | None, intact: set[Path]) -> str:
    """What to do about a damaged folder: an earlier checkpoint for a checkpoint, else how to write it again."""
    if _is_checkpoint(folder):
        run = folder.parent.parent
        earlier = sorted(c for c in intact if c.parent == folder.parent and c.name < folder.name)
        config = run / "config.yaml" if (run / "config.yaml").is_file() else "CONFIG"
        if earlier:
            return (f"resume from the previous checkpoint, `{earlier[-1]}`: `mixmodal train {config} --out {run} "
                    f"--resume` sets the damaged one aside and starts there")
        return f"no earlier checkpoint of {run} is intact: start the run again (`mixmodal train {config} --out NEW`)"
    remake = (manifest or {}).get("remake")
    return remake or "copy the folder again from where it came from"


def _is_checkpoint(folder: Path) -> bool:
    from mixmodal.train.checkpoint import CHECKPOINT_NAME  # (torch: not at CLI start-up)

    return folder.parent.name == "checkpoints" and CHECKPOINT_NAME.match(folder.name) is not None


def _bank(folder: Path) -> Finding:
    from mixmodal.retrieval.bank import BankError, MemoryBank

    try:
        bank = MemoryBank.open(folder)
        for i in range(len(bank)):
            bank.document(i)  # every record parses, every image it names decodes
    except (BankError, OSError, IndexError) as e:
        return Finding(folder, "DAMAGED", str(e))
    note = f"; {bank.pending}" if bank.pending else ""
    return Finding(folder, "ok", f"memory bank of {len(bank)} documents: files agree, every document reads back{note}")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


__all__ = ["Finding", "cmd_verify", "register", "verify_path"]
