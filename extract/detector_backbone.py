"""The Caffe-style ResNet-101 of the bottom-up-attention detector: C4 backbone and res5 head.

Module and parameter names follow detectron2 (``stem.conv1.weight``,
``res4.22.conv3.norm.running_var``, ...), because the published PyTorch conversion of the
Caffe model is a detectron2 state dict. The blocks differ from torchvision's
``Bottleneck`` in three ways that the Caffe weights depend on. The stride sits in the
first 1x1 convolution (the original MSRA ResNet). Every batch norm is frozen and attached
to its convolution as ``conv.norm``. The stem's max pooling rounds up, as Caffe's pooling
does. So torchvision's block class cannot hold these weights by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

STEM_CHANNELS = 64
RES4_CHANNELS = 1024
RES5_CHANNELS = 2048
BACKBONE_STRIDE = 16  # res4 is 1/16 of the input


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by a frozen batch norm (detectron2's ``Conv2d`` with ``norm``).

    The batch norm is folded into the convolution's weight and bias, so that under
    autocast the layer is one reduced-precision convolution instead of a bfloat16
    convolution followed by a float32 affine map. The folded tensors are cached in the
    compute dtype and rebuilt whenever a parameter or buffer changes in place, as weight
    loading does. Folding and casting the 42M convolution weights on every call cost as
    much as the convolutions themselves on small CPU inputs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        )
        self.norm = FrozenBatchNorm2d(out_channels)
        self._folded_key: tuple | None = None
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None

    def _folded_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.norm
        sources = (self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        key = (dtype, self.weight.device, self.weight.stride(), *(t._version for t in sources))
        if self._folded is None or key != self._folded_key:
            with torch.no_grad():
                scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
                shift = norm.bias - norm.running_mean * scale
                weight = self.weight * scale.view(-1, 1, 1, 1)
            self._folded = (weight.to(dtype), shift.to(dtype))
            self._folded_key = key
        return self._folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else self.weight.dtype
        )
        weight, bias = self._folded_weights(dtype)
        return F.conv2d(x.to(dtype), weight, bias, self.stride, self.padding, self.dilation)


class CaffeBottleneck(nn.Module):
    """A ResNet bottleneck block with the stride in the first 1x1 convolution.

    The 3x3 convolution may be dilated (the res5 head uses dilation 2 at stride 1).
    A projection shortcut exists when the channel count changes, as in detectron2.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
    ):
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride)
            if in_channels != out_channels
            else None
        )
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride)
        self.conv2 = ConvNorm(
            bottleneck_channels, bottleneck_channels, 3, padding=dilation, dilation=dilation
        )
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


def make_stage(
    num_blocks: int,
    in_channels: int,
    bottleneck_channels: int,
    out_channels: int,
    first_stride: int,
    dilation: int = 1,
) -> nn.Sequential:
    """Build one ResNet stage; only its first block changes stride and channel count."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(
            CaffeBottleneck(
                in_channels if index == 0 else out_channels,
                bottleneck_channels,
                out_channels,
                stride=first_stride if index == 0 else 1,
                dilation=dilation,
            )
        )
    return nn.Sequential(*blocks)


class CaffeStem(nn.Module):
    """7x7/2 convolution, frozen batch norm, ReLU and a 3x3/2 max pooling that rounds up."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvNorm(3, STEM_CHANNELS, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        # Caffe's pooling computes the output size with ceil, detectron2 keeps that.
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4Backbone(nn.Module):
    """ResNet-101 stem, res2, res3 and res4: (B, 3, H, W) -> (B, 1024, ~H/16, ~W/16)."""

    # Blocks per stage of ResNet-101 up to res4 (res5 has 3 and lives in the box head).
    BLOCKS = {"res2": 3, "res3": 4, "res4": 23}

    def __init__(self):
        super().__init__()
        self.stem = CaffeStem()
        self.res2 = make_stage(3, STEM_CHANNELS, 64, 256, first_stride=1)
        self.res3 = make_stage(4, 256, 128, 512, first_stride=2)
        self.res4 = make_stage(23, 512, 256, RES4_CHANNELS, first_stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.res2(x)
        x = self.res3(x)
        return self.res4(x)


def make_res5_head() -> nn.Sequential:
    """Build the res5 stage run on each 14x14 RoI: stride 1 with dilation 2, so the output stays 14x14.

    The published Caffe test network (models/vg/ResNet-101/faster_rcnn_end2end_final/
    test.prototxt of peteanderson80/bottom-up-attention) and MILVLG's converted config
    (RES5_DILATION: 2) both run res5 this way.
    """
    return make_stage(3, RES4_CHANNELS, 512, RES5_CHANNELS, first_stride=1, dilation=2)
