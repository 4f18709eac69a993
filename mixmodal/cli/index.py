"""`mixmodal index build | query | add | info`: a retrieval memory bank, a FAISS index of a source's
documents embedded by a dual encoder, with the documents stored beside it (docs/retrieval.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixmodal.cli.common import add_source_options, no_overrides, report_bad_input, source_from, take
from mixmodal.data.bad_input import BadInputLog


def register(verbs: argparse._SubParsersAction) -> None:
    index = verbs.add_parser("index", help="build and query a retrieval memory bank (FAISS index + documents)",
                             description="Build, query and extend a retrieval memory bank: the documents of a source "
                             "embedded by a dual encoder (the mean of text and image embeddings, CM3Leon §2.1) in a "
                             "FAISS inner-product index, with the documents stored beside it.")
    index_verbs = index.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = index_verbs.add_parser("build", help="embed a source's documents into a new index",
                               description="Embed the documents of SOURCE with the dual encoder and write an index "
                               "folder (bank.json, index.faiss, embeddings.npy, keys.npy, store/). The folder is "
                               "written beside OUT and renamed into place when complete; an existing index at OUT is "
                               "replaced.")
    add_source_options(p)
    p.add_argument("--encoder", required=True, help="dual-encoder directory (`mixmodal train` dual-encoder task, "
                   "or `mixmodal convert hf-clip`)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="flat: exact (up to ~1M documents); ivf: inverted lists (millions); "
                   "hnsw: a graph (fast, more memory)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(N), at most N/39)")
    p.add_argument("--num", type=int, default=None, help="index the first N documents only")
    p.add_argument("--batch-size", type=int, default=256, help="documents per encoder forward")
    p.add_argument("--overwrite", action="store_true", help="replace OUT even when it is a folder that is not an index")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index_build)

    p = index_verbs.add_parser("query", help="the documents of an index nearest to a text or an image",
                               description="Embed a text or an image with the index's encoder and print the nearest "
                               "documents: rank, score (cosine), store id, modalities, text and image paths. "
                               "--select applies CM3Leon's selection rules (modality, diversity) instead of plain "
                               "ranking.")
    p.add_argument("index", metavar="INDEX", help="index folder (`mixmodal index build`)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", default=None, help="query text")
    query.add_argument("--image", default=None, help="query image file")
    p.add_argument("--k", type=int, default=5, help="documents to show")
    p.add_argument("--encoder", default=None, help="dual-encoder directory (default: the one bank.json records; "
                   "its fingerprint must match)")
    p.add_argument("--select", action="store_true", help="apply the selection rules (multimodal first, near-copies "
                   "and near-duplicates > 0.9 skipped)")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    p.set_defaults(func=cmd_index_query)

    p = index_verbs.add_parser("add", help="append a source's documents to an index",
                               description="Embed the documents of SOURCE with the index's encoder and append them "
                               "(no rebuild; an IVF index keeps its trained lists).")
    p.add_argument("index", metavar="INDEX", help="index folder (`mixmodal index build`)")
    add_source_options(p)
    p.add_argument("--num", type=int, default=None, help="add the first N documents only")
    p.add_argument("--encoder", default=None, help="dual-encoder directory (default: the one bank.json records; "
                   "its fingerprint must match)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per encoder forward")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index_add)

    p = index_verbs.add_parser("info", help="summarise an index and check that its files agree",
                               description="Print bank.json (count, dim, kind, encoder, sources, modalities) and "
                               "check that the index, embeddings, keys and store agree; exit 1 when they do not.")
    p.add_argument("index", metavar="INDEX", help="index folder")
    p.add_argument("--json", action="store_true", help="print bank.json with ok / problem as JSON")
    p.set_defaults(func=cmd_index_info)


def cmd_index_build(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.retrieval import bank as memory_bank

    no_overrides("index build", overrides)
    embedder = memory_bank.load_document_embedder(args.encoder)
    source = source_from(args)
    docs = tqdm(take(source, args.num), total=args.num, desc="index", unit="doc", disable=args.quiet)
    bank = memory_bank.MemoryBank.build(docs, embedder, args.out, kind=args.kind, batch_size=args.batch_size,
                                        source=args.source, progress=False, nlist=args.nlist, overwrite=args.overwrite)
    for note in bank.notes:
        print(f"note: {note}")
    _report_ingest("indexed", bank, source, f"into a {bank.kind} index")
    return 0


def cmd_index_add(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.retrieval.bank import MemoryBank

    no_overrides("index add", overrides)
    bank = MemoryBank.open(args.index)
    embedder = bank.load_embedder(args.encoder)
    source = source_from(args)
    docs = tqdm(take(source, args.num), total=args.num, desc="add", unit="doc", disable=args.quiet)
    bank.add(docs, embedder, batch_size=args.batch_size, source=args.source)
    _report_ingest("added", bank, source, f"({len(bank)} in all)")
    return 0


def _report_ingest(verb: str, bank, source, where: str) -> None:
    stats = bank.last_ingest
    shown = ", ".join(f"{n} {m}" for m, n in stats.modalities.items() if n)
    print(f"{verb} {stats.added} documents ({shown or 'none'}) {where} in {stats.seconds:.1f}s -> {bank.path}; "
          f"skipped {source.log.num_skipped} bad input, {stats.skipped_empty} empty")
    report_bad_input(source)


def cmd_index_query(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.images import decode_image
    from mixmodal.documents import Document, Image, Text
    from mixmodal.retrieval.bank import MemoryBank
    from mixmodal.retrieval.select import nearest
    from mixmodal.retrieval.store import modality

    no_overrides("index query", overrides)
    bank = MemoryBank.open(args.index)
    embedder = bank.load_embedder(args.encoder)
    if args.text is not None:
        query = Document([Text(args.text)])
    else:
        query = Document([Image(decode_image(None, args.image, log=BadInputLog(strict=True)), origin=args.image)])
    found = nearest(bank, embedder, query, args.k, rules=args.select)
    for rank, (i, score) in enumerate(found, start=1):
        doc = bank.document(i)
        text = " ".join(doc.texts)
        images = [p.origin for p in doc.parts if isinstance(p, Image)]
        kind = modality(bool(text.strip()), bool(images))
        if args.json:
            print(json.dumps({"rank": rank, "score": round(float(score), 6), "id": i, "doc_id": doc.id,
                              "modalities": kind, "text": text, "images": images}, ensure_ascii=False))
        else:
            shown = text if len(text) <= 80 else text[:77] + "..."
            print(f"{rank:>3}  {score:.4f}  #{i:<7} {kind:<10} {shown!r}" + "".join(f"  {p}" for p in images))
    if not found and not args.json:
        print(f"nothing retrieved from {bank.path} ({len(bank)} documents)")
    return 0


def cmd_index_info(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.retrieval.bank import BankError, MemoryBank, read_bank_json

    no_overrides("index info", overrides)
    meta = read_bank_json(args.index)
    try:
        MemoryBank.open(args.index)
        problem = None
    except BankError as e:
        problem = str(e)
    encoder = meta["encoder"]
    if args.json:
        print(json.dumps({**meta, "ok": problem is None, "problem": problem}, indent=2))
    else:
        params = ", ".join(f"{k}={v}" for k, v in meta.get("index_params", {}).items())
        print(f"{args.index}: {meta['count']} documents, dim {meta['dim']}, {meta['kind']} index"
              f"{' (' + params + ')' if params else ''}, {meta['metric']}\n"
              f"  modalities: {', '.join(f'{n} {m}' for m, n in meta.get('modalities', {}).items())}\n"
              f"  encoder:    {encoder['path']}{'' if Path(encoder['path']).exists() else ' (missing)'} "
              f"(fingerprint {encoder['fingerprint'][:12]}...)\n"
              f"  sources:    {', '.join(meta.get('sources', [])) or '-'}\n"
              f"  created:    {meta.get('created', '-')}" + (f", updated {meta['updated']}" if "updated" in meta else ""))
        check = "ok: index, embeddings, keys and store agree" if problem is None else f"FAILED: {problem}"
        print(f"  check:      {check}")
    return 0 if problem is None else 1
