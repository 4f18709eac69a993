"""A feature network for FID on `shapes`, trained by mixmodal itself: no download needed.

    extractor = default_feature_net(64)   # trains once (about a minute on one CPU thread), then cached
    compute_fid(extractor, real_batches, fake_batches)["fid"]

`ShapesFeatureNet` reads a shapes image into a 256-d feature (the FID features) and, from
it, predicts the scene: per grid cell whether it is occupied and the shape, colour and
size of its object, and the background. Trained on rendered `train` scenes until it reads
`heldout` scenes almost perfectly (>= 99% per attribute at 32 and 64 px, 97% at 128), its
features encode what the world is made of, so their Frechet distance measures whether
generated images get objects, colours, sizes, layout and backgrounds right. It never sees
the held-out shape-colour pairs, and on them it reads shape less well (about 75%): FIDs on
`heldout-combos` images are coarser. Its FIDs are NOT comparable to Inception FIDs, nor
across feature nets of another resolution, seed or version: the extractor's name says so
and is stored with every result.

Axes: B batch, C channels, R the training resolution, K = 9 grid cells (reading order).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapesConfig
from mixmodal.data.shapes import render_array, sample_scene
from mixmodal.data.shapes.scene import COLOURS_ORDER
from mixmodal.eval.fid import check_images

VERSION = "shapes-features-v1"  # bump when the architecture, the data or the training recipe changes
NUM_CELLS = len(POSITIONS)
ATTRIBUTES = ("occupancy", "shape", "colour", "size", "background")
MODEL_FILE, META_FILE = "model.safetensors", "feature_net.json"
NUM_EVAL_SCENES = 512
ACCURACY_BAR = 0.95  # held-out accuracy per attribute the default recipe must reach
DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 32
MAP_SIZE = 8  # side of the last feature map, whatever the resolution
# Resolutions a feature net is trained at (MAP_SIZE * 2^k); the world's other sizes (48 px) are
# resized up to the next one (`net_resolution`).
RESOLUTIONS = (32, 64, 128)


class FeatureNetError(ValueError):
    pass


@dataclass
class FeatureNetConfig:
    resolution: int = 64  # images of any size are resized to this
    # One conv stage each (two 3x3 convs): stride 2 until the map is MAP_SIZE x MAP_SIZE, then stride 1.
    widths: tuple[int, ...] = (24, 48, 96, 128)
    cell_dim: int = 28  # numbers per grid cell in the feature
    background_dim: int = 4  # the feature is NUM_CELLS * cell_dim + background_dim = 256 numbers

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.resolution not in RESOLUTIONS:
            raise FeatureNetError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}; "
                                  f"got {self.resolution!r}")
        if any(w % 8 for w in self.widths):
            raise FeatureNetError(f"widths must be multiples of 8 (GroupNorm uses 8 groups); got {self.widths}")
        if len(self.widths) < self.num_downsamples:
            raise FeatureNetError(f"{self.resolution} px needs at least {self.num_downsamples} stages to reach a "
                                  f"{MAP_SIZE}x{MAP_SIZE} map; got widths {self.widths}")

    @property
    def num_downsamples(self) -> int:
        return int(np.log2(self.resolution // MAP_SIZE))

    @property
    def dim(self) -> int:
        return NUM_CELLS * self.cell_dim + self.background_dim


def default_config(resolution: int) -> FeatureNetConfig:
    widths = {32: (32, 64, 128), 64: (24, 48, 96, 128), 128: (16, 32, 64, 96, 128)}.get(resolution, ())
    return FeatureNetConfig(resolution=resolution, widths=widths)


class ShapesFeatureNet(nn.Module):
    """Conv stages -> a MAP_SIZE^2 map -> one code per grid cell (max over the cell, then
    a linear map shared by all cells) and a background code (average over the image):
    their concatenation is the feature. The heads read each cell's code with one small
    MLP shared by all cells (a shape is a shape in any cell), the background from its code.
    """

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        self.config = config
        layers, channels = [], 3
        for k, width in enumerate(config.widths):
            stride = 2 if k < config.num_downsamples else 1
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.stages = nn.Sequential(*layers)
        self.to_cell_code = nn.Linear(channels, config.cell_dim)
        self.to_background_code = nn.Linear(channels, config.background_dim)
        num_classes = 2 + len(SHAPES) + len(COLOURS) + len(SIZES)
        self.cell_head = nn.Sequential(nn.SiLU(), nn.Linear(config.cell_dim, 64), nn.SiLU(),
                                       nn.Linear(64, num_classes))
        self.background_head = nn.Sequential(nn.SiLU(), nn.Linear(config.background_dim, len(BACKGROUNDS)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, dim): K cell codes, then the background code."""
        size = self.config.resolution
        if images.shape[-2:] != (size, size):
            downsampling = min(images.shape[-2:]) > size
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=downsampling)
        x = self.stages(2 * images - 1)  # (B, C, 8, 8)
        # Max over each cell: a detector that fires anywhere in the cell counts (it also learns
        # far faster than the average).
        cells = F.adaptive_max_pool2d(x, 3).flatten(2).transpose(1, 2)  # (B, K, C), K in reading order
        cell_codes = self.to_cell_code(cells).flatten(1)  # (B, K * cell_dim)
        background_code = self.to_background_code(x.mean((2, 3)))  # (B, background_dim)
        return torch.cat([cell_codes, background_code], 1)  # (B, dim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.features(images)
        batch, cfg = feature.shape[0], self.config
        cell_logits = self.cell_head(feature[:, :NUM_CELLS * cfg.cell_dim].view(batch, NUM_CELLS, cfg.cell_dim))
        occupancy, shapes, colours, sizes = cell_logits.split([2, len(SHAPES), len(COLOURS), len(SIZES)], -1)
        return {
            "occupancy": occupancy,  # (B, K, 2): empty, occupied
            "shape": shapes,  # (B, K, 6)
            "colour": colours,  # (B, K, 8)
            "size": sizes,  # (B, K, 2)
            "background": self.background_head(feature[:, NUM_CELLS * cfg.cell_dim:]),  # (B, 3)
        }


class ShapesFeatures:
    """A FeatureExtractor: the features of a trained ShapesFeatureNet."""

    comparable = False

    def __init__(self, model: ShapesFeatureNet, metadata: dict, path: Path | None = None) -> None:
        self.model = model.eval()
        self.metadata = metadata
        self.path = path
        self.resolution = model.config.resolution
        self.dim = model.config.dim
        self.name = f"shapes-features-{self.resolution}px (mixmodal, NOT comparable to Inception FID)"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images, "shapes features")
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model.features(images.to(device, torch.float32))  # (B, dim)


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Labels of the heads: occupancy (B, K) in {0, 1}; shape, colour and size (B, K),
    -100 (F.cross_entropy's ignore_index) in empty cells; background (B,)."""
    occupancy = np.zeros((len(scenes), NUM_CELLS), dtype=np.int64)
    labels = {name: np.full((len(scenes), NUM_CELLS), -100, dtype=np.int64) for name in ("shape", "colour", "size")}
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            occupancy[b, obj.cell] = 1
            labels["shape"][b, obj.cell] = SHAPES.index(obj.shape)
            labels["colour"][b, obj.cell] = COLOURS_ORDER.index(obj.colour)
            labels["size"][b, obj.cell] = SIZES.index(obj.size)
    backgrounds = [tuple(BACKGROUNDS).index(s.background) for s in scenes]
    return {"occupancy": torch.from_numpy(occupancy), **{k: torch.from_numpy(v) for k, v in labels.items()},
            "background": torch.tensor(backgrounds)}


def render_batch(scenes: list[Scene], resolution: int) -> torch.Tensor:
    """(B, 3, R, R) float in [0, 1]."""
    pixels = np.stack([render_array(scene, resolution) for scene in scenes])  # (B, R, R, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def world(seed: int) -> ShapesConfig:
    return ShapesConfig(min_objects=1, max_objects=4, background="random", seed=seed)


def loss_breakdown(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy per attribute, each a mean over the cells that have it (shape, colour
    and size over occupied cells only), and their sum."""
    losses = {name: F.cross_entropy(outputs[name].flatten(0, -2), targets[name].flatten()) for name in ATTRIBUTES}
    losses["total"] = sum(losses.values())
    return losses


def accuracy(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy: occupancy over all cells; shape, colour and size over
    occupied cells; background per image; `scene` is the fraction of scenes read exactly."""
    right = {name: outputs[name].argmax(-1) == targets[name] for name in ATTRIBUTES}  # (B, K) or (B,)
    occupied = targets["occupancy"] == 1  # (B, K)
    result = {name: float(right[name][occupied].float().mean()) for name in ("shape", "colour", "size")}
    result["occupancy"] = float(right["occupancy"].float().mean())
    result["background"] = float(right["background"].float().mean())
    cell_right = right["occupancy"] & (~occupied | (right["shape"] & right["colour"] & right["size"]))  # (B, K)
    result["scene"] = float((cell_right.all(-1) & right["background"]).float().mean())
    return {name: result[name] for name in (*ATTRIBUTES, "scene")}


def evaluate(model: ShapesFeatureNet, split: str = "heldout", num_scenes: int = NUM_EVAL_SCENES) -> dict[str, float]:
    """Accuracy on the first `num_scenes` scenes of a held-out split (fixed whatever the seed)."""
    scenes = [sample_scene(world(0), split, index) for index in range(num_scenes)]
    images = render_batch(scenes, model.config.resolution)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = [model(chunk) for chunk in images.split(128)]
    model.train(was_training)
    merged = {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}
    return accuracy(merged, scene_targets(scenes))


def train_feature_net(resolution: int, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
                      seed: int = 0, out: str | Path | None = None, config: FeatureNetConfig | None = None,
                      learning_rate: float = 3e-3, num_eval_scenes: int = NUM_EVAL_SCENES,
                      log_every: int = 0) -> ShapesFeatures:
    """Train on freshly rendered `train` scenes (1-4 objects, random backgrounds), a pure
    function of its arguments (on one device and thread count); evaluate on the first
    `num_eval_scenes` `heldout` scenes; save to `out` (model.safetensors + feature_net.json)
    when given. The default recipe reads held-out scenes >= 99% right at 32 and 64 px."""
    config = config or default_config(resolution)
    if config.resolution != resolution:
        raise FeatureNetError(f"config.resolution {config.resolution} differs from resolution {resolution}")
    if steps < 1 or batch_size < 1:
        raise FeatureNetError(f"steps and batch_size must be >= 1; got {steps} and {batch_size}")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # init from the seed, leaving the global stream alone
        torch.manual_seed(seed)
        model = ShapesFeatureNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine decay to 0
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + np.cos(np.pi * step / steps))))
    data = world(seed)  # the data order depends on the seed only through the train stream
    model.train()
    for step in range(steps):
        scenes = [sample_scene(data, "train", step * batch_size + i) for i in range(batch_size)]
        losses = loss_breakdown(model(render_batch(scenes, resolution)), scene_targets(scenes))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            parts = " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
            print(f"feature net step {step}/{steps}: {parts} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - start
    metadata = {
        "version": VERSION,
        "architecture": {"class": "ShapesFeatureNet", **asdict(config)},
        "resolution": resolution, "steps": steps, "batch_size": batch_size, "seed": seed,
        "learning_rate": learning_rate,
        "num_eval_scenes": num_eval_scenes,
        "heldout_accuracy": evaluate(model, "heldout", num_eval_scenes),
        # Shape-colour pairs never seen in training: the net partly reads shape from colour there.
        "heldout_combos_accuracy": evaluate(model, "heldout-combos", num_eval_scenes),
        "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
    }
    model.eval()
    if out is not None:
        save_feature_net(model, metadata, Path(out))
    return ShapesFeatures(model, metadata, Path(out) if out is not None else None)


def save_feature_net(model: ShapesFeatureNet, metadata: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / MODEL_FILE))
    (out / META_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> ShapesFeatures:
    """A feature net saved by train_feature_net (a directory with model.safetensors and feature_net.json)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    fix = (f"retrain it with train_feature_net(resolution, out={str(path)!r}), or delete {path} if it is "
           "default_feature_net's cache, which then retrains it")
    for name in (META_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise FeatureNetError(f"{path / name} does not exist: {path} is not a saved feature net; {fix}")
    try:
        metadata = json.loads((path / META_FILE).read_text())
        architecture = dict(metadata["architecture"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise FeatureNetError(f"{path / META_FILE} is not a valid feature_net.json ({type(err).__name__}: {err}); "
                              f"{fix}") from None
    if metadata.get("version") != VERSION:
        raise FeatureNetError(f"{path / META_FILE} holds a feature net of version {metadata.get('version')!r}; "
                              f"this mixmodal reads {VERSION!r} (FIDs of different versions do not compare); {fix}")
    if architecture.pop("class", None) != "ShapesFeatureNet":
        raise FeatureNetError(f"{path / META_FILE}: architecture.class must be ShapesFeatureNet; {fix}")
    try:
        model = ShapesFeatureNet(FeatureNetConfig(**architecture))
    except TypeError as err:
        raise FeatureNetError(f"{path / META_FILE}: bad architecture {architecture} ({err}); {fix}") from None
    try:
        state = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise FeatureNetError(f"{path / MODEL_FILE} is not a readable safetensors file ({err}); {fix}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[:3]
        raise FeatureNetError(f"{path / MODEL_FILE} does not match the architecture in {META_FILE}: "
                              f"{' '.join(first)}; {fix}") from None
    return ShapesFeatures(model.to(device), metadata, path)


def cache_root() -> Path:
    """$MIXMODAL_CACHE, or ~/.cache/mixmodal."""
    return Path(os.environ.get("MIXMODAL_CACHE") or Path.home() / ".cache" / "mixmodal").expanduser()


def net_resolution(resolution: int) -> int:
    """The feature net's resolution for images of `resolution` px: the smallest of RESOLUTIONS that
    is at least as large (48 px images are scored by the 64 px net, resized up)."""
    larger = [r for r in RESOLUTIONS if r >= resolution]
    if not larger:
        raise FeatureNetError(f"no shapes feature net for {resolution} px images; the largest is "
                              f"{RESOLUTIONS[-1]} px")
    return larger[0]


def default_feature_net(resolution: int, device: str | torch.device = "cpu") -> ShapesFeatures:
    """The feature net for `resolution` px images from the cache (cache_root()/feature-nets/shapes-{R}px-v1,
    R = net_resolution(resolution)), trained there on first use with the default recipe and seed 0."""
    resolution = net_resolution(resolution)
    path = cache_root() / "feature-nets" / f"shapes-{resolution}px-{VERSION.rsplit('-', 1)[-1]}"
    if not path.exists():
        estimate = {32: "half a minute", 64: "a minute", 128: "2-3 minutes"}[resolution]  # on one CPU thread
        print(f"mixmodal: training the shapes feature net for FID at {resolution}px once "
              f"(about {estimate} on one CPU core, less on more); caching it in {path}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Train into a temporary sibling and rename it into place: an interrupted run never
        # leaves a half-written cache, and of two concurrent runs the first rename wins.
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            trained = train_feature_net(resolution, out=staging)
            try:
                staging.rename(path)
            except OSError:
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        accuracy_text = ", ".join(f"{k} {v:.3f}" for k, v in trained.metadata["heldout_accuracy"].items())
        print(f"mixmodal: feature net trained in {trained.metadata['train_seconds']:.0f} s; "
              f"held-out accuracy {accuracy_text}", flush=True)
    return load_feature_net(path, device)
