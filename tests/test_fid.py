"""FID: the Frechet distance against closed forms and torchmetrics, the FID Inception's
layout against pytorch-fid's weights file, and the shapes feature net."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.data.shapes import sample_scene
from mixmodal.eval import feature_net as fn
from mixmodal.eval import inception
from mixmodal.eval.fid import FeatureExtractor, FeatureStats, compute_fid, frechet_distance
from mixmodal.eval.inception import FIDInceptionV3, InceptionError, load_inception
from mixmodal.weights import file_sha256


# ---------------------------------------------------------------- the Frechet distance


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-10)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_offsets_a_singular_product_and_rejects_invalid_covariances():
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # sqrtm of it is infinite: pytorch-fid's eps path
    with pytest.warns(UserWarning, match="singular"):
        assert np.isfinite(frechet_distance(np.zeros(2), nilpotent, np.zeros(2), np.eye(2)))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="differ in length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)) * rng.uniform(0.5, 2, size=6) + 1e4  # a large mean: the shifted sums keep precision
    stats = FeatureStats()
    for chunk in np.array_split(x, [3, 4, 20, 37]):
        stats.update(torch.from_numpy(chunk) if len(chunk) == 1 else chunk)  # tensors and arrays alike
    assert stats.n == 50
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(FeatureStats.from_features(x).cov, np.cov(x, rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match="dimension 5"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(x[:1]).cov


class PooledProjection:
    """A small deterministic FeatureExtractor: a fixed random projection of 4x4-pooled pixels."""

    name, comparable, dim = "pooled-projection", False, 16

    def __init__(self) -> None:
        self.weight = torch.randn(48, self.dim, generator=torch.Generator().manual_seed(0))  # (3 * 4 * 4, D)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.weight  # (B, D)


class AsTorchmetricsFeature(nn.Module):
    """torchmetrics calls a custom feature module on the float [0, 1] images as given
    (normalize=True) and reads `num_features` instead of running a dummy image."""

    def __init__(self, extractor: PooledProjection) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.features(images)


def image_sets(num_batches: int = 4, batch_size: int = 16) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    real = [torch.rand(batch_size, 3, 32, 32, generator=g) for _ in range(num_batches)]
    fake = [torch.rand(batch_size, 3, 32, 32, generator=g) ** 1.5 for _ in range(num_batches)]  # darker
    return real, fake


def test_compute_fid_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = PooledProjection()
    assert isinstance(extractor, FeatureExtractor)
    real, fake = image_sets()
    ours = compute_fid(extractor, real, fake)
    metric = FrechetInceptionDistance(feature=AsTorchmetricsFeature(extractor), normalize=True)
    for images in real:
        metric.update(images, real=True)
    for images in fake:
        metric.update(images, real=False)
    reference = float(metric.compute())
    assert reference > 1.0  # the two sets differ, so the comparison means something
    assert ours["fid"] == pytest.approx(reference, rel=1e-4)
    assert ours == {"fid": ours["fid"], "n_real": 64, "n_fake": 64, "features": "pooled-projection",
                    "comparable": False, "note": None}
    assert compute_fid(extractor, real, real)["fid"] == pytest.approx(0, abs=1e-6)


def test_compute_fid_refuses_too_few_images_and_notes_singular_covariances():
    extractor = PooledProjection()
    real, fake = image_sets(num_batches=1, batch_size=8)
    with pytest.raises(ValueError, match="at least 2 fake images"):
        compute_fid(extractor, real, [fake[0][:1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy may warn that the covariance product is singular
        result = compute_fid(extractor, real[0], fake[0])  # a single tensor is one batch, not 8 images
    assert result["n_real"] == 8 and "singular" in result["note"]


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float"),
    (torch.full((2, 3, 8, 8), -1.0), r"\[0, 1\]"),
    (torch.zeros(3, 8, 8), "batch axis"),
])
def test_compute_fid_rejects_bad_images(bad, message):
    with pytest.raises(ValueError, match=message):
        compute_fid(PooledProjection(), [bad], [bad])


# ---------------------------------------------------------------- the FID Inception

# Names and shapes of pytorch-fid's state dict, read off torchvision's Inception3 and
# pytorch-fid's fid_inception_v3() (num_classes=1008, aux_logits=False).
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.bn.weight": (192,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7c.branch3x3_2b.bn.running_var": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# Computed by hand: stem 172,672 + Mixed_5b-d 818,528 + 6a 1,153,280 + 6b-e 6,821,376
# + 7a 1,698,304 + 7b-c 11,121,408 + fc 2,065,392 (torchvision's inception_v3, 27,161,264,
# less AuxLogits' 3,326,696, plus fc's 8 extra classes x 2049).
FID_INCEPTION_PARAMETERS = 23_850_960


def test_fid_inception_layout_matches_pytorch_fid():
    model = FIDInceptionV3()
    state = model.state_dict()
    for key, shape in PYTORCH_FID_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    assert sum(isinstance(m, inception.BasicConv2d) for m in model.modules()) == 94
    assert len(state) == 94 * 6 + 2  # conv.weight, bn.{weight,bias,running_mean,running_var,num_batches_tracked}; fc
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMETERS


def test_fid_patches_pool_like_tensorflow():
    """The pooling branches: average without the zero padding (FIDInceptionA/C/E_1),
    max in Mixed_7c (FIDInceptionE_2), checked through a branch_pool 1x1 conv set to identity."""
    def pool_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = block.branch_pool.conv
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:4, :, 0, 0] = torch.eye(4)  # its first 4 outputs copy the pooled input
            block.branch_pool.bn.running_var.fill_(1 - 1e-3)  # BatchNorm is then the identity
            out = block.eval()(x)
        return out[:, out.shape[1] - conv.out_channels:][:, :4]  # the pooling branch comes last

    ones = torch.ones(1, 4, 5, 5)
    for block in (inception.InceptionA(4, pool_features=4), inception.InceptionE(4, pool="avg")):
        assert torch.allclose(pool_branch(block, ones), ones)  # a corner averages 4 pixels, not 4 of 9 with zeros
    spike = torch.zeros(1, 4, 5, 5)
    spike[..., 2, 2] = 9.0
    out = pool_branch(inception.InceptionE(4, pool="max"), spike)
    assert torch.allclose(out[..., 1:4, 1:4], torch.full((1, 4, 3, 3), 9.0))  # an average would give 1


def random_fid_inception() -> FIDInceptionV3:
    """Random weights that keep activations alive through all 94 layers (He init), with
    perturbed BatchNorm statistics so a loader that skipped them would show."""
    g = torch.Generator().manual_seed(0)
    model = FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
                module.weight.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
                module.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> tuple[FIDInceptionV3, Path]:
    model = random_fid_inception()
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_NAME
    # Like a file from PyTorch <= 1.5: no BatchNorm num_batches_tracked, the legacy (non-zip)
    # format (the real file's 95,628,359 bytes are near this one's and far from a zip's).
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return model, path


def test_load_inception_reproduces_the_module(inception_file, monkeypatch):
    model, path = inception_file
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # resized to 299 inside
    with torch.no_grad():
        expected = model(images)  # (2, 2048)
    assert expected.std() > 1e-2  # the random network is not dead
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", file_sha256(path))  # pretend it is pytorch-fid's
    extractor = load_inception(path)
    assert (extractor.name, extractor.comparable, extractor.dim) == ("inception-v3 (pytorch-fid weights)", True, 2048)
    assert isinstance(extractor, FeatureExtractor)
    assert torch.allclose(extractor.features(images), expected, rtol=1e-5, atol=1e-6)


def test_load_inception_marks_other_weights_not_comparable(inception_file):
    with pytest.warns(UserWarning, match="not pytorch-fid's weights"):
        extractor = load_inception(inception_file[1])
    assert not extractor.comparable and "NOT pytorch-fid" in extractor.name


def test_load_inception_explains_wrong_files(inception_file, tmp_path):
    model, path = inception_file
    with pytest.raises(InceptionError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        load_inception(tmp_path / "missing.pth")
    assert "missing.pth" in str(err.value) and "github.com/mseitzer/pytorch-fid" in str(err.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(InceptionError, match="could not be read as PyTorch weights"):
        load_inception(garbage)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(InceptionError, match="does not hold a state dict"):
        load_inception(not_a_state_dict)

    torchvision_like = tmp_path / "inception_v3_google.pth"
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768), "fc.weight": torch.zeros(1000, 2048)}, torchvision_like)
    with pytest.raises(InceptionError, match="torchvision's ImageNet Inception") as err:
        load_inception(torchvision_like)
    assert "Conv2d_1a_3x3.bn.bias" in str(err.value)  # names the first missing keys

    state = torch.load(path, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(InceptionError, match=r"fc.bias \(1000,\) \(expected \(1008,\)\)"):
        load_inception(wrong_shape)


# ---------------------------------------------------------------- the shapes feature net

TINY = fn.FeatureNetConfig(resolution=32, widths=(8, 16, 16))


def train_tiny(out: Path | None, seed: int = 0) -> fn.ShapesFeatures:
    return fn.train_feature_net(32, steps=2, batch_size=4, seed=seed, out=out, config=TINY, num_eval_scenes=8)


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> tuple[fn.ShapesFeatures, Path]:
    out = tmp_path_factory.mktemp("feature_net") / "net"
    return train_tiny(out), out


def shapes_images(resolution: int, count: int = 4) -> torch.Tensor:
    scenes = [sample_scene(fn.world(0), "heldout", i) for i in range(count)]
    return fn.render_batch(scenes, resolution)  # (count, 3, R, R)


def test_feature_net_saves_and_reloads(tiny_net):
    trained, path = tiny_net
    loaded = fn.load_feature_net(path)
    assert isinstance(loaded, FeatureExtractor)
    assert (loaded.name, loaded.comparable, loaded.dim) == (
        "shapes-features-32px (mixmodal, NOT comparable to Inception FID)", False, 256)
    for resolution in (32, 64):  # other sizes are resized to the training resolution
        images = shapes_images(resolution)
        assert torch.equal(loaded.features(images), trained.features(images))
        assert loaded.features(images).shape == (4, 256)
    meta = json.loads((path / fn.META_FILE).read_text())
    assert meta["version"] == fn.VERSION and meta["steps"] == 2 and meta["seed"] == 0
    assert set(meta["heldout_accuracy"]) == {*fn.ATTRIBUTES, "scene"}
    assert meta["architecture"]["widths"] == [8, 16, 16]


def test_feature_net_training_is_deterministic(tiny_net):
    a, b, c = tiny_net[0], train_tiny(None, seed=0), train_tiny(None, seed=1)
    images = shapes_images(32)
    assert torch.equal(a.features(images), b.features(images))
    assert not torch.equal(a.features(images), c.features(images))


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_feature_net_default_architectures(resolution):
    model = fn.ShapesFeatureNet(fn.default_config(resolution))
    outputs = model(shapes_images(resolution, count=2))
    assert model.features(shapes_images(64, count=2)).shape == (2, 256)
    assert outputs["shape"].shape == (2, 9, 6) and outputs["background"].shape == (2, 3)


def test_load_feature_net_explains_broken_files(tiny_net, tmp_path):
    shutil.copytree(tiny_net[1], tmp_path / "net")
    with pytest.raises(fn.FeatureNetError, match="does not exist"):
        fn.load_feature_net(tmp_path / "nowhere")
    model_file = tmp_path / "net" / fn.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])  # a truncated copy
    with pytest.raises(fn.FeatureNetError, match="model.safetensors is not a readable safetensors file"):
        fn.load_feature_net(tmp_path / "net")
    (tmp_path / "net" / fn.META_FILE).write_text("{not json")
    with pytest.raises(fn.FeatureNetError, match="feature_net.json is not a valid"):
        fn.load_feature_net(tmp_path / "net")
    (tmp_path / "net" / fn.META_FILE).write_text(json.dumps({"version": "shapes-features-v0", "architecture": {}}))
    with pytest.raises(fn.FeatureNetError, match="version 'shapes-features-v0'"):
        fn.load_feature_net(tmp_path / "net")


def test_default_feature_net_trains_once_into_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXMODAL_CACHE", str(tmp_path))
    real_train = fn.train_feature_net
    calls = []

    def quick_train(resolution, out):
        calls.append(out)
        return real_train(resolution, steps=1, batch_size=2, out=out, config=TINY, num_eval_scenes=4)

    def interrupted(resolution, out):
        quick_train(resolution, out)
        raise KeyboardInterrupt  # after writing its files, before the rename

    monkeypatch.setattr(fn, "train_feature_net", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fn.default_feature_net(32)
    assert list((tmp_path / "feature-nets").iterdir()) == []  # no half-written cache, no staging left over

    monkeypatch.setattr(fn, "train_feature_net", quick_train)
    first = fn.default_feature_net(32)
    second = fn.default_feature_net(32)
    assert len(calls) == 2  # the interrupted run and one real one; the second call loaded the cache
    assert first.path == second.path == tmp_path / "feature-nets" / "shapes-32px-v1"
    assert "training the shapes feature net for FID at 32px once" in capsys.readouterr().out
    images = shapes_images(32)
    assert torch.equal(first.features(images), second.features(images))


@pytest.mark.slow
def test_feature_net_reaches_the_accuracy_bar(tmp_path):
    """The default recipe at 64 px (about a minute on one CPU thread)."""
    trained = fn.train_feature_net(64, out=tmp_path / "net")
    accuracy = trained.metadata["heldout_accuracy"]
    assert min(accuracy[name] for name in fn.ATTRIBUTES) >= fn.ACCURACY_BAR, accuracy


def test_images_between_net_sizes_use_the_next_larger_net():
    assert [fn.net_resolution(r) for r in (32, 48, 64, 128)] == [32, 64, 64, 128]
    with pytest.raises(fn.FeatureNetError, match="no shapes feature net for 256 px"):
        fn.net_resolution(256)
