"""Readers: round trips, the COCO reader, sharding over ranks x DataLoader workers, and
`open_source` dispatch. All fixtures are generated in tmp_path."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch.utils.data

from mixmodal.data import bad_input
from mixmodal.data.bad_input import BadInputError
from mixmodal.data.sources import (
    CocoCaptionsSource,
    CocoFormatError,
    JsonlSource,
    ShapesSource,
    Source,
    SourceSpecError,
    WebDatasetSource,
    open_source,
    write_webdataset,
)
from mixmodal.documents import Document, Image, Text, write_jsonl


# --- fixtures -------------------------------------------------------------------------

def noise(seed: int, size: int = 8) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_docs(num: int = 10) -> list[Document]:
    """Every third document is interleaved (text, image, text, image); the rest are pairs."""
    docs = []
    for i in range(num):
        if i % 3 == 2:
            parts = [Text(f"before {i}"), Image(noise(i)), Text("between"), Image(noise(100 + i, size=6))]
        else:
            parts = [Image(noise(i)), Text(f"caption {i} ünïcode")]
        docs.append(Document(parts, {"index": i, "tags": ["a", "b"]}, f"doc-{i}"))
    return docs


def assert_same_documents(got: list[Document], expected: list[Document]) -> None:
    assert [d.id for d in got] == [d.id for d in expected]
    for a, b in zip(got, expected):
        assert a.metadata == b.metadata
        assert [type(p) for p in a.parts] == [type(p) for p in b.parts]
        assert a.texts == b.texts
        for x, y in zip(a.images, b.images):
            assert np.array_equal(np.asarray(x), np.asarray(y))


def make_coco(tmp_path, num_images: int = 6) -> tuple:
    """COCO's own layout: annotations/captions_val2017.json next to val2017/."""
    image_dir = tmp_path / "val2017"
    image_dir.mkdir()
    images, annotations = [], []
    for i in range(num_images):
        name = f"{i:012d}.png"
        noise(i).save(image_dir / name)
        images.append({"id": 100 + i, "file_name": name, "width": 8, "height": 8})
    for k in range(2):  # captions of different images interleave, as in the real files
        for i in range(num_images):
            annotations.append({"id": len(annotations), "image_id": 100 + i, "caption": f" image {i} caption {k}\n"})
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path, image_dir


@dataclasses.dataclass
class FakeShapesConfig:
    resolution: int = 32
    seed: int = 0
    tasks: tuple[str, ...] = ("caption",)
    background: float = 0.5
    crowded: bool = False


def fake_shapes_document(config: FakeShapesConfig, split: str, index: int) -> Document:
    return Document([Text(f"{split} {index} {config.seed}")], id=f"{split}-{index}")


@pytest.fixture
def fake_shapes(monkeypatch):
    """The shapes contract, for testing the adapter apart from the real world."""
    module = types.ModuleType("mixmodal.data.shapes")
    module.ShapesConfig = FakeShapesConfig
    module.shapes_document = fake_shapes_document
    monkeypatch.setitem(sys.modules, "mixmodal.data.shapes", module)
    return module


# --- round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("image_dir", ["images", None], ids=["files", "base64"])
def test_jsonl_round_trip(tmp_path, image_dir):
    docs = make_docs()
    path = tmp_path / "data" / "documents.jsonl"
    assert write_jsonl(docs, path, image_dir=image_dir) == len(docs)
    source = JsonlSource(path, strict=True)
    assert_same_documents(list(source), docs)
    assert source.summary() == "bad input: none"


def test_jsonl_many_files_by_glob(tmp_path):
    docs = make_docs(7)
    write_jsonl(docs[:3], tmp_path / "a.jsonl", image_dir=None)
    write_jsonl(docs[3:], tmp_path / "b.jsonl", image_dir=None)
    assert_same_documents(list(JsonlSource(str(tmp_path / "*.jsonl"))), docs)
    with pytest.raises(FileNotFoundError, match="no JSONL file matches"):
        JsonlSource(str(tmp_path / "*.nothing.jsonl"))


def test_webdataset_round_trip(tmp_path):
    docs = make_docs()
    docs.append(Document([Image(noise(50)), Text("metadata with an id key")], {"id": "not the doc id"}, "doc-x"))
    shards = write_webdataset(docs, tmp_path, shard_size=4)
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    source = WebDatasetSource(str(tmp_path / "shard-{000000..000002}.tar"), strict=True)
    assert_same_documents(list(source), docs)


def test_webdataset_rewrite_replaces_old_shards(tmp_path):
    write_webdataset(make_docs(6), tmp_path, shard_size=2)
    (tmp_path / "other-000009.tar").write_bytes(b"")  # another prefix: not ours to remove
    assert len(write_webdataset(make_docs(3), tmp_path, shard_size=2)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-000009.tar", "shard-000000.tar", "shard-000001.tar"]
    assert len(list(open_source(str(tmp_path / "shard-{000000..000001}.tar")))) == 3


def test_webdataset_layouts_and_default_ids(tmp_path):
    import tarfile

    docs = [Document([Image(noise(0)), Text("pair")]), Document([Text("t"), Image(noise(1))], id="multi")]
    (shard,) = write_webdataset(docs, tmp_path)
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    assert names == [
        "000000000.json", "000000000.png", "000000000.txt",  # (a) LAION layout
        "000000001.0.png", "000000001.json",  # (b) multi-part: image parts are members
    ]
    got = list(WebDatasetSource(str(shard)))
    assert [d.id for d in got] == ["000000000", "multi"]  # no id: the sample key
    assert got[1].parts[1].origin.endswith("shard-000000.tar:000000001.0.png")


# --- COCO -----------------------------------------------------------------------------

def test_coco_first_caption(tmp_path):
    annotations, image_dir = make_coco(tmp_path)
    docs = list(CocoCaptionsSource(annotations, image_dir, strict=True))
    assert [d.id for d in docs] == [f"coco-{100 + i}" for i in range(6)]
    assert docs[2].texts == ["image 2 caption 0"]  # first by annotation order, stripped
    assert docs[2].metadata["captions"] == ["image 2 caption 0", "image 2 caption 1"]
    assert docs[2].metadata["coco_id"] == 102
    assert np.array_equal(np.asarray(docs[2].images[0]), np.asarray(noise(2)))


def test_coco_all_captions(tmp_path):
    annotations, image_dir = make_coco(tmp_path, num_images=3)
    docs = list(CocoCaptionsSource(annotations, image_dir, captions="all"))
    assert [d.texts[0] for d in docs[:2]] == ["image 0 caption 0", "image 0 caption 1"]
    assert len(docs) == 6 and docs[1].id == "coco-100-1" and docs[1].metadata["caption_index"] == 1


def test_coco_bad_images_and_entries_are_skipped(tmp_path):
    annotations, image_dir = make_coco(tmp_path)
    data = json.loads(annotations.read_text())
    data["images"].append({"id": 999, "file_name": "uncaptioned.png"})
    data["annotations"].append({"image_id": 12345, "caption": "of no image"})
    annotations.write_text(json.dumps(data))
    (image_dir / "000000000001.png").unlink()
    (image_dir / "000000000002.png").write_bytes(b"not a png")
    noise(9).save(image_dir / "uncaptioned.png")

    source = CocoCaptionsSource(annotations, image_dir)
    assert [d.metadata["coco_id"] for d in source] == [100, 103, 104, 105]
    assert dict(source.log.skipped) == {
        bad_input.MISSING_IMAGE: 1, bad_input.CORRUPT_IMAGE: 1, bad_input.MISSING_FIELD: 1, bad_input.BAD_SCHEMA: 1,
    }
    summary = source.summary()
    for where in ("val2017/000000000001.png", "val2017/000000000002.png", "val2017/uncaptioned.png", "annotations[12]"):
        assert where in summary
    with pytest.raises(BadInputError, match="annotations\\[12\\]"):
        list(CocoCaptionsSource(annotations, image_dir, strict=True))


def test_coco_malformed_annotations_is_a_hard_error(tmp_path):
    annotations, image_dir = make_coco(tmp_path)
    annotations.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match="captions_val2017.json: not a readable JSON file"):
        CocoCaptionsSource(annotations, image_dir)
    annotations.write_text('{"images": []}')
    with pytest.raises(CocoFormatError, match='"images" and "annotations" lists'):
        CocoCaptionsSource(annotations, image_dir)


# --- shapes ---------------------------------------------------------------------------

def test_shapes_source_with_the_contract(fake_shapes):
    source = ShapesSource(FakeShapesConfig(seed=7), split="heldout", num=5)
    assert [d.texts[0] for d in source] == [f"heldout {i} 7" for i in range(5)]
    endless = iter(ShapesSource(split="train", num=None, rank=1, world_size=3))
    assert [next(endless).id for _ in range(4)] == ["train-1", "train-4", "train-7", "train-10"]
    with pytest.raises(ValueError, match="heldout-combos"):
        ShapesSource(split="test")


def test_real_shapes_world_is_deterministic():
    whole = [doc_key(d) for d in real_shapes_source()]  # skips while the world is unwritten
    assert whole == [doc_key(d) for d in real_shapes_source()] and len(set(whole)) == 13
    source = open_source("shapes:resolution=32,split=heldout,num=3,tasks=caption")
    assert source.config.resolution == 32 and source.config.tasks == ["caption"]
    assert len(list(source)) == 3


# --- sharding -------------------------------------------------------------------------

def doc_key(doc: Document) -> tuple:
    return (doc.id, tuple(doc.texts), tuple(np.asarray(i).tobytes() for i in doc.images))


def build_readers(tmp_path) -> dict:
    docs = make_docs(11)
    write_jsonl(docs, tmp_path / "jsonl" / "documents.jsonl")
    write_webdataset(docs, tmp_path / "four", shard_size=3)  # 4 shards: by shard
    write_webdataset(docs, tmp_path / "one", shard_size=100)  # 1 shard: by sample
    annotations, image_dir = make_coco(tmp_path, num_images=7)
    return {
        "jsonl": lambda **kw: JsonlSource(tmp_path / "jsonl", **kw),
        "wds-by-shard": lambda **kw: WebDatasetSource(str(tmp_path / "four" / "shard-{000000..000003}.tar"), **kw),
        "wds-by-sample": lambda **kw: WebDatasetSource(str(tmp_path / "one" / "shard-000000.tar"), **kw),
        "coco": lambda **kw: CocoCaptionsSource(annotations, image_dir, captions="all", **kw),
        "shapes": lambda **kw: ShapesSource(FakeShapesConfig(), num=13, **kw),
    }


def real_shapes_source(**kwargs) -> ShapesSource:
    shapes = pytest.importorskip("mixmodal.data.shapes")
    if not hasattr(shapes, "shapes_document"):  # the package is still being written
        pytest.skip("mixmodal.data.shapes does not export shapes_document yet")
    return ShapesSource(shapes.ShapesConfig(resolution=32), num=13, **kwargs)


READERS = ["jsonl", "wds-by-shard", "wds-by-sample", "coco", "shapes"]


@pytest.mark.parametrize("reader", READERS)
def test_sharding_over_ranks_and_dataloader_workers(tmp_path, reader):
    # The real shapes world here: a module faked in sys.modules would not reach workers
    # started by spawn or forkserver (the default from Python 3.14).
    make = real_shapes_source if reader == "shapes" else build_readers(tmp_path)[reader]
    whole = [doc_key(d) for d in make()]
    assert len(set(whole)) == len(whole) > 4
    parts = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(make(rank=rank, world_size=2), batch_size=None, num_workers=2)
        parts.append([doc_key(d) for d in loader])
    assert all(parts)
    assert sorted(parts[0] + parts[1]) == sorted(whole)  # disjoint, and nothing missing


@pytest.mark.parametrize("reader", READERS)
def test_every_consumer_gets_its_own_share(tmp_path, fake_shapes, monkeypatch, reader):
    make = build_readers(tmp_path)[reader]
    whole = [doc_key(d) for d in make()]
    shares = []
    for rank in range(2):
        for worker in range(2):
            info = types.SimpleNamespace(id=worker, num_workers=2)
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            source = make(rank=rank, world_size=2)
            assert source.consumer() == (rank * 2 + worker, 4)
            shares.append([doc_key(d) for d in source])
    assert all(shares), [len(s) for s in shares]  # even one shard feeds four consumers
    assert sorted(sum(shares, [])) == sorted(whole)


def test_rank_must_be_below_world_size(tmp_path):
    write_jsonl(make_docs(1), tmp_path / "documents.jsonl")
    with pytest.raises(ValueError, match="rank < world_size"):
        JsonlSource(tmp_path, rank=2, world_size=2)


# --- open_source ----------------------------------------------------------------------

def test_open_source_dispatch(tmp_path, fake_shapes):
    docs = make_docs(4)
    write_jsonl(docs, tmp_path / "j" / "documents.jsonl")
    write_webdataset(docs, tmp_path / "w", shard_size=2)
    annotations, image_dir = make_coco(tmp_path, num_images=2)
    cases = {
        str(tmp_path / "j" / "documents.jsonl"): JsonlSource,
        str(tmp_path / "j"): JsonlSource,
        f"jsonl:{tmp_path}/j/*.jsonl": JsonlSource,
        str(tmp_path / "w"): WebDatasetSource,
        str(tmp_path / "w" / "shard-000000.tar"): WebDatasetSource,
        str(tmp_path / "w" / "shard-{000000..000001}.tar"): WebDatasetSource,
        f"wds:{tmp_path}/w/shard-000001.tar": WebDatasetSource,
        f"coco:{annotations}?images={image_dir}": CocoCaptionsSource,
        f"coco:{annotations}": CocoCaptionsSource,  # images: ../val2017 by COCO's layout
        "shapes": ShapesSource,
    }
    for spec, kind in cases.items():
        source = open_source(spec, rank=0, world_size=1)
        assert type(source) is kind, spec
        assert isinstance(source, Source) and isinstance(next(iter(source)), Document), spec  # shapes: endless
    assert len(list(open_source(str(tmp_path / "w")))) == 4  # both shards of the folder
    every = open_source(f"coco:{annotations}?captions=all", strict=True)
    assert len(list(every)) == 4 and every.log.strict


def test_open_shapes_spec_converts_fields(fake_shapes):
    spec = "shapes:resolution=64,split=heldout,num=3,seed=5,tasks=caption+qa,background=0.25,crowded=true"
    source = open_source(spec)
    assert source.split == "heldout" and source.num == 3
    assert source.config == FakeShapesConfig(64, 5, ("caption", "qa"), 0.25, True)
    assert len(list(source)) == 3


def test_open_source_errors(tmp_path, fake_shapes):
    with pytest.raises(SourceSpecError, match="shapes.colour: unknown key; allowed keys of FakeShapesConfig: resolution, seed.*split and num") as e:
        open_source("shapes:colour=red")
    with pytest.raises(SourceSpecError, match="shapes.resolution: expected an integer, got 'big'"):
        open_source("shapes:resolution=big")
    with pytest.raises(SourceSpecError, match="accepted forms:") as e:
        open_source(str(tmp_path / "nothing.jsonl"))
    assert "shapes:resolution=64" in str(e.value) and "coco:ANNOTATIONS.json" in str(e.value)
    with pytest.raises(SourceSpecError, match="no such file or folder"):
        open_source("no/such/place")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceSpecError, match="neither documents.jsonl nor \\*.tar"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceSpecError, match="do not exist"):
        open_source(str(tmp_path / "shard-{000..003}.tar"))
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(SourceSpecError, match="add \\?images=DIR"):
        open_source(f"coco:{tmp_path / 'a.json'}")
