"""The Source base class: a Document stream sharded over ranks and DataLoader workers.

A *consumer* is one (rank, worker) pair: there are world_size * num_workers of them and
consumer = rank * num_workers + worker, worked out inside `__iter__` (so a Source is a
plain IterableDataset to a DataLoader). Each reader gives consumer c of n the records
whose index is c modulo n, by its own notion of index, so shards are disjoint, their
union is the whole source, and a consumer never parses or decodes other consumers' records.

Counts live in the Source object that iterates: with DataLoader workers each worker
counts into its own copy, so read `log` in the process that iterated it.
"""

from __future__ import annotations

from typing import Iterator

import PIL.Image
import torch.utils.data

from mixmodal.data.bad_input import EMPTY_DOCUMENT, BadInputLog
from mixmodal.data.images import DEFAULT_MAX_PIXELS, decode_image
from mixmodal.documents import Document


class Source(torch.utils.data.IterableDataset):
    """A stream of Documents, sharded over ranks and DataLoader workers.

    `strict=True` raises BadInputError on the first bad record instead of skipping it;
    pass an existing `log` to count several sources together (then `strict` is its own).
    Iterating twice counts bad records twice: the log is a running tally.
    """

    def __init__(
        self,
        *,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        rank: int = 0,
        world_size: int = 1,
        log: BadInputLog | None = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.log = log if log is not None else BadInputLog(strict=strict)
        self.max_pixels = max_pixels
        self.rank = rank
        self.world_size = world_size

    def consumer(self) -> tuple[int, int]:
        """(this consumer's index, number of consumers), from rank and the DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def __iter__(self) -> Iterator[Document]:
        return self._documents(*self.consumer())

    def _documents(self, consumer: int, num_consumers: int) -> Iterator[Document]:
        raise NotImplementedError

    def summary(self) -> str:
        return self.log.summary()

    def _decode(self, data: bytes | None, origin: str, where: str | None = None) -> PIL.Image.Image | None:
        return decode_image(data, origin, log=self.log, max_pixels=self.max_pixels, where=where)

    def _sharding(self) -> str:
        return "" if self.world_size == 1 else f", rank={self.rank}, world_size={self.world_size}"


class SourceSpecError(ValueError):
    """A source spec string that names no readable source; the message says which forms work."""


class ImageSkipped(Exception):
    """An image of the record was bad and is already logged; drop the whole record."""


def check_not_empty(doc: Document, where: str, log: BadInputLog) -> bool:
    """False (and a logged skip) for a document with no image and no non-blank text."""
    if not doc.is_empty():
        return True
    detail = "no parts" if not doc.parts else "only blank text"
    log.skip(where, EMPTY_DOCUMENT, f"{detail}; a document needs an image or non-blank text")
    return False
