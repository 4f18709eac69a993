"""Image batches for tokenizer training, resumable exactly: float (B, 3, R, R) in [-1, 1].

Two paths, picked from the source spec:
- the shapes world: image i is the render of `sample_scene(config, split, i)` (the first
  image of shapes document i), a pure function of i, so the state is the next index and
  resuming costs nothing; DataLoader workers render in parallel, in index order.
- any other source (`open_source`): every image of every document, centre-cropped and
  resized; the state counts batches consumed and a resume skips that many (the
  stream restarts from the top when it runs out).

With several processes (torchrun) each rank reads its own shard: shapes images in blocks
of one batch, rank r taking blocks r, r + world_size, ... (so N ranks see together, per
step, exactly the images one process sees with N times the grad_accumulation); any other
source through its own rank/world_size sharding. The state is per rank.

No flips or crops for shapes: positions are part of what the oracle checks.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
import torch.utils.data

from mixmodal.data.shapes import render_array, sample_scene
from mixmodal.data.sources import ShapesSource, open_source
from mixmodal.tokenizers.pixels import images_to_tensor
from mixmodal.train import distributed


def open_image_source(spec: str, resolution: int, **options):
    """`open_source(spec, **options)`, rendering shapes at `resolution` unless the spec names one."""
    return open_source(with_resolution(spec, resolution), **options)


def with_resolution(spec: str, resolution: int) -> str:
    """A shapes spec (also inside a mix:) made to render at `resolution` unless it names one."""
    if spec.startswith("mix:"):
        return "mix:" + "|".join(with_resolution(item, resolution) for item in spec[len("mix:"):].split("|"))
    if (spec == "shapes" or spec.startswith("shapes:")) and "resolution=" not in spec:
        spec = f"shapes:resolution={resolution}" + ("," + spec.partition(":")[2] if ":" in spec else "")
    return spec


class ShapesImages(torch.utils.data.Dataset):
    """Image i of a shapes split (map-style; endless, so no __len__) and its scene."""

    def __init__(self, source: ShapesSource) -> None:
        self.config, self.split, self.num = source.config, source.split, source.num

    def scene(self, index: int):
        return sample_scene(self.config, self.split, index)

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = torch.from_numpy(render_array(self.scene(index), self.config.resolution))  # (R, R, 3) uint8
        return pixels.permute(2, 0, 1).float() / 127.5 - 1  # (3, R, R) in [-1, 1]


class _ShardedCount(torch.utils.data.Sampler):
    """Image indices of one rank from its `start`-th image on: batch-sized blocks rank,
    rank + world_size, ... of 0, 1, 2, ... (with one rank: start, start + 1, ...)."""

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        for position in itertools.count(self.start):
            block, offset = divmod(position, self.batch_size)
            yield (block * self.world_size + self.rank) * self.batch_size + offset


class _SourceImages(torch.utils.data.IterableDataset):
    """Every image of a Source's documents as (3, R, R) tensors (shards by worker via the Source)."""

    def __init__(self, source, resolution: int) -> None:
        self.source, self.resolution = source, resolution

    def __iter__(self) -> Iterator[torch.Tensor]:
        for doc in self.source:
            for image in doc.images:
                yield images_to_tensor([image], self.resolution)[0]


class ImageBatches:
    """Endless, resumable batches of images from a source spec (a trainer DataIterator).

    `rank` / `world_size` select this process's shard (default: the process group's)."""

    def __init__(self, spec: str, resolution: int, batch_size: int, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        self.source = open_image_source(spec, resolution, rank=self.rank, world_size=self.world_size)
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.shapes = isinstance(self.source, ShapesSource)
        if self.shapes and self.source.config.resolution != resolution:
            raise ValueError(f"data source {spec!r} renders {self.source.config.resolution} px images but the "
                             f"tokenizer trains at {resolution} px; drop resolution= from the spec or make them equal")
        if self.shapes and self.source.num is not None:
            raise ValueError(f"data source {spec!r}: training streams endlessly; drop num= from the shapes spec")
        self.position = 0  # shapes: images this rank consumed; otherwise: batches consumed
        self._iterator: Iterator | None = None

    def _loader(self, dataset, **kwargs) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                           persistent_workers=False, **kwargs)

    def _start(self) -> Iterator:
        if self.shapes:
            sampler = _ShardedCount(self.position, self.batch_size, self.rank, self.world_size)
            return iter(self._loader(ShapesImages(self.source), sampler=sampler))
        return self._stream(skip=self.position)

    def _stream(self, skip: int) -> Iterator[torch.Tensor]:
        dataset = _SourceImages(self.source, self.resolution)
        produced = 0
        while True:
            for batch in self._loader(dataset, drop_last=True):
                produced += 1
                if produced > skip:
                    yield batch
            if produced == 0:
                raise ValueError(f"data source {self.source!r} holds fewer than batch_size={self.batch_size} images")

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)  # (B, 3, R, R)
        self.position += batch.shape[0] if self.shapes else 1
        return batch

    def state_dict(self) -> dict:
        return {"shapes_index" if self.shapes else "batches": self.position}

    def load_state_dict(self, state: dict) -> None:
        key = "shapes_index" if self.shapes else "batches"
        if key not in state:
            raise ValueError(f"the checkpoint's data state {state} does not fit source {self.source!r} "
                             "(was the run started with another data.source?)")
        self.position, self._iterator = int(state[key]), None


def eval_images(spec: str, resolution: int, num: int) -> tuple[torch.Tensor, list[dict | None]]:
    """The first `num` images of a source, (num, 3, R, R) in [-1, 1], and each one's scene dict
    when the source knows it (shapes documents' metadata["scenes"]), else None."""
    source = open_image_source(spec, resolution)
    if isinstance(source, ShapesSource):
        dataset = ShapesImages(source)
        images = torch.stack([dataset[i] for i in range(num)])
        return images, [dataset.scene(i).to_dict() for i in range(num)]
    tensors, scenes = [], []
    for doc in source:
        known = doc.metadata.get("scenes") or []
        for j, image in enumerate(doc.images):
            tensors.append(images_to_tensor([image], resolution)[0])
            scenes.append(known[j] if j < len(known) else None)
            if len(tensors) == num:
                return torch.stack(tensors), scenes
    if not tensors:
        raise ValueError(f"eval source {spec!r} holds no images")
    return torch.stack(tensors), scenes
