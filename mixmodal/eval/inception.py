"""The FID Inception network, loading pytorch-fid's weights file; no torchvision needed.

    extractor = load_inception("pt_inception-2015-12-05-6726825d.pth")
    extractor.features(images)  # (B, 3, H, W) in [0, 1] -> (B, 2048)

`FIDInceptionV3` is torchvision's `Inception3(num_classes=1008, aux_logits=False)` with
pytorch-fid's patched blocks, i.e. pytorch-fid's `fid_inception_v3()`, the port of the
TensorFlow graph that published FIDs use. Its module names are torchvision's, so the
weights file's state dict loads with strict=True. The patches (pytorch-fid's
FIDInceptionA/C/E_1/E_2): the pooling branch of Mixed_5b-5d, 6b-6e and 7b averages
without counting the zero padding (TensorFlow's average pool), and Mixed_7c's pooling
branch takes the max instead of the average.

`features` runs it as pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`
with output block 3: bilinear resize to 299x299, scale to [-1, 1], and the 2048-d average
pool after Mixed_7c. `fc` (1008 ImageNet classes) is loaded but unused.

The weights come from github.com/mseitzer/pytorch-fid/releases (fid_weights); nothing is
downloaded here. A file with the right layout but other content (its SHA-256 differs)
still loads, as a feature network whose FIDs are marked not comparable.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.eval.fid import check_images
from mixmodal.weights import file_sha256

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
# SHA-256 of pytorch-fid's file (95,628,359 bytes; torch.hub names files by its first 8 hex digits).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
FIX = (f"FID comparable to published numbers needs pytorch-fid's Inception weights, {WEIGHTS_NAME} "
       f"(95.6 MB): download it from {WEIGHTS_URL} (or copy it from ~/.cache/torch/hub/checkpoints/ of a "
       "machine where pytorch-fid has run) and pass its path")


class InceptionError(ValueError):
    pass


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=0.001) -> ReLU, as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, that ignores the zero padding, as TensorFlow's."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """pytorch-fid's FIDInceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a, unpatched): the grid reduction 35 -> 17."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)  # (B, 480 + in_channels, H', W')


class InceptionC(nn.Module):
    """pytorch-fid's FIDInceptionC: factorised 7x7 convolutions, TF avg pool."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)  # (B, 768, H, W)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a, unpatched): the grid reduction 17 -> 8."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)  # (B, 512 + in_channels, H', W')


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (pool="avg", Mixed_7b: TF avg pool) and
    FIDInceptionE_2 (pool="max", Mixed_7c: the FID graph max-pools here)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be avg or max; got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)  # (B, 2048, H, W)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's fid_inception_v3(): 23,850,960 parameters (21,785,568 without `fc`)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, NUM_CLASSES)  # in the weights file; the FID features stop before it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> pool3 features (B, 2048)."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1]
        for block in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,  # -> (B, 64, 73, 73)
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,  # -> (B, 192, 35, 35)
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,  # -> (B, 288, 35, 35)
                      self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,  # -> (B, 768, 17, 17)
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # -> (B, 2048, 8, 8)
            x = block(x)
        return self.avgpool(x).flatten(1)  # (B, 2048)


class InceptionFeatures:
    """A FeatureExtractor: pool3 features of the FID Inception network."""

    dim = FEATURE_DIM

    def __init__(self, model: FIDInceptionV3, sha256: str | None = None, path: Path | None = None) -> None:
        self.model = model.eval()
        self.sha256 = sha256
        self.path = path
        self.comparable = sha256 == WEIGHTS_SHA256
        if self.comparable:
            self.name = "inception-v3 (pytorch-fid weights)"
        else:
            origin = f"sha256 {sha256[:12]}" if sha256 else "in-memory weights"
            self.name = f"inception-v3 layout, NOT pytorch-fid's weights ({origin}; not comparable to published FID)"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images, "inception features")
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model(images.to(device, torch.float32))  # (B, 2048)


def _first(names, count: int = 5) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def _check_state_dict(state: object, path: Path, model: FIDInceptionV3) -> dict[str, torch.Tensor]:
    """`state` with any missing BatchNorm `num_batches_tracked` counters filled in (old
    files lack them; they play no part in inference), or an InceptionError."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        what = f"a {type(state).__name__}"
        if isinstance(state, Mapping):
            what += f" with keys {_first(map(str, state.keys()))}"
        raise InceptionError(f"{path} does not hold a state dict (parameter name -> tensor) but {what}. {FIX}")
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        hint = ""
        if any(k.startswith("AuxLogits.") for k in unexpected):
            hint = ("It looks like torchvision's ImageNet Inception (inception_v3_google), a different network "
                    "whose FIDs differ from published ones. ")
        elif any(k.startswith(("blocks.", "module.")) for k in unexpected):
            hint = "Its keys carry a wrapper's prefix (blocks./module.): save the bare Inception state dict. "
        raise InceptionError(f"{path} is not the FID Inception's state dict: "
                             f"{len(missing)} keys missing ({_first(missing) or 'none'}), "
                             f"{len(unexpected)} unexpected ({_first(unexpected) or 'none'}). {hint}{FIX}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise InceptionError(f"{path}: {len(wrong)} tensors have the wrong shape: {'; '.join(wrong[:5])}. {FIX}")
    return {**{k: expected[k] for k in optional - set(state)}, **state}


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception network with the weights of `path` (pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth), as a FeatureExtractor."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionError(f"no Inception weights file at {path}. {FIX}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated download, HTML error page, a pickled model object, ...
        raise InceptionError(f"{path} could not be read as PyTorch weights ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}). {FIX}") from None
    model = FIDInceptionV3()
    model.load_state_dict(_check_state_dict(state, path, model), strict=True)
    sha256 = file_sha256(path)
    if sha256 != WEIGHTS_SHA256:
        warnings.warn(f"{path} has the FID Inception's layout but not pytorch-fid's weights (sha256 {sha256[:12]}, "
                      f"expected {WEIGHTS_SHA256[:12]}); its FIDs are marked not comparable to published ones",
                      stacklevel=2)
    return InceptionFeatures(model.to(device), sha256=sha256, path=path)
