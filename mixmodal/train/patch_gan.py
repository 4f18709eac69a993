"""PatchGAN discriminator and hinge losses, as in pix2pix and taming-transformers' VQGAN.

The discriminator scores overlapping patches (one logit per receptive field), so the
adversarial loss pushes for locally sharp edges rather than whole-image realism. The
adaptive weight (taming) balances the adversarial gradient against the reconstruction
gradient at the decoder's last layer, so the GAN neither vanishes nor takes over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GANConfig:
    weight: float = 0.0  # weight of the adversarial loss; 0 = no discriminator at all
    start_step: int = 0  # update at which the discriminator (and its loss) switch on
    adaptive_weight: bool = True  # scale by |grad rec| / |grad adv| at the decoder's last layer (taming)
    channels: int = 64  # width of the first discriminator layer
    num_layers: int = 3  # strided layers (3: a 70x70 receptive field at full size)
    lr: float | None = None  # None: the trainer's lr

    def __post_init__(self) -> None:
        if self.weight < 0 or self.start_step < 0 or self.channels < 1 or self.num_layers < 1:
            raise ValueError("loss.gan: weight and start_step must be >= 0, channels and num_layers >= 1")


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) -> patch logits (B, 1, h, w): conv, then num_layers-1 strided conv + norm
    + LeakyReLU(0.2) blocks, a stride-1 block and a 1-channel conv (pix2pix's NLayerDiscriminator).
    GroupNorm instead of BatchNorm: batch statistics would make a sample's score depend
    on its batch, and break with data parallelism."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = c
        for i in range(1, config.num_layers + 1):
            out = c * min(2**i, 8)
            stride = 2 if i < config.num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, out // 4) or 1, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """|d rec / d W| / |d adv / d W| at the decoder's last weight W (detached; taming's formula)."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gen_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def last_decoder_weight(model: nn.Module) -> torch.Tensor:
    """The weight of the decoder's final convolution (the layer the adaptive weight looks at)."""
    decoder = getattr(model, "decoder", model)
    convs = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no decoder convolution for the adaptive GAN weight; "
                         "set loss.gan.adaptive_weight=false")
    return convs[-1].weight
