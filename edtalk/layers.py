"""Building blocks shared by the encoder and the decoder (StyleGAN2 / LIA vocabulary).

Every block keeps the parameter names of the published EDTalk networks so that the official
checkpoints load with ``strict=True``. The default path uses only export-safe PyTorch ops:
FIR filtering is a depthwise convolution, and the modulated convolution is the batch-friendly
form (scale the input by the style, one shared convolution, demodulate the output) instead of
one grouped convolution per sample. Both give the same numbers as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D kernel ``[K,K]`` (sums to 1)."""
    t = torch.tensor(list(k), dtype=torch.float32)
    if t.ndim == 1:
        t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample: ``[B,C,H,W] -> [B,C,H',W']``.

    Same numbers as the reference ``upfirdn2d_native``. Zero insertion followed by the filter is
    computed as one depthwise transposed convolution when the padding allows it (it always does
    for the decoder's layers), which avoids 6-D reshapes in exported graphs.
    """
    b, c, h, w = x.shape
    c, kh, kw = int(c), int(kernel.shape[0]), int(kernel.shape[1])   # static for export (channels never vary)
    p0, p1 = pad
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].expand(c, 1, kh, kw)
    if up > 1:
        offset = kh - 1 - p0          # first output sample inside the full transposed convolution
        tail = kh - up - p1           # samples cropped at the end
        if kh == kw and offset == tail and offset >= 0 and torch.equal(kernel, torch.flip(kernel, [0, 1])):
            out = F.conv_transpose2d(x, weight, stride=up, padding=offset, groups=c)
            return out[:, :, ::down, ::down] if down > 1 else out
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    if p0 < 0 or p1 < 0:
        x = x[:, :, max(-p0, 0): x.shape[2] - max(-p1, 0), max(-p0, 0): x.shape[3] - max(-p1, 0)]
    return F.conv2d(x, weight, stride=down, groups=c)


class Blur(nn.Module):
    """FIR low-pass filter with padding ``pad`` (no resampling)."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor**2
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class Upsample(nn.Module):
    """2x FIR upsampling: ``[B,C,H,W] -> [B,C,2H,2W]``."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * factor**2
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = 2**0.5) -> torch.Tensor:
    return F.leaky_relu(x + bias, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Bias, leaky ReLU (0.2), gain sqrt(2). ``bias`` is ``[1,C,1,1]``."""

    def __init__(self, channels: int, negative_slope: float = 0.2, scale: float = 2**0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class ScaledLeakyReLU(nn.Module):
    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, negative_slope=self.negative_slope)


class EqualConv2d(nn.Module):
    """Convolution with equalised learning rate (weight scaled by ``1/sqrt(fan_in)`` at run time)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: ``[..., in] -> [..., out]``."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.scale, bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d + [FusedLeakyReLU]; ``downsample`` halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[float] = BLUR_KERNEL, bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels) if bias else ScaledLeakyReLU(0.2))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual downsampling block of the encoder: ``[B,Cin,H,W] -> [B,Cout,H/2,W/2]``."""

    def __init__(self, in_channels: int, out_channels: int, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False, bias=False,
                              blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution in the batch-friendly form.

    ``x [B,Cin,H,W]``, ``style [B,D]`` -> ``[B,Cout,H',W']``. Instead of building one weight per
    sample and running a grouped convolution, the input is scaled by the style, a single shared
    convolution runs over the whole batch, and the output is multiplied by the demodulation
    coefficients ``rsqrt(sum_i,k (w*s)^2 + 1e-8)``. Identical in exact arithmetic to the
    reference, and it batches across frames and sessions and exports to ONNX/TensorRT.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)                                # [B,Cin]
        w = self.weight[0] * self.scale                           # [Cout,Cin,k,k]
        x = x * s[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, w.transpose(0, 1), stride=2, padding=0)
        else:
            out = F.conv2d(x, w, padding=self.padding)
        if self.demodulate:
            wsq = w.pow(2).sum(dim=(2, 3))                        # [Cout,Cin]
            demod = torch.rsqrt(F.linear(s.pow(2), wsq) + 1e-8)   # [B,Cout]
            out = out * demod[:, :, None, None]
        if self.upsample:
            out = self.blur(out)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, {self.kernel_size}, upsample={self.upsample}, "
                f"demodulate={self.demodulate}")


class NoiseInjection(nn.Module):
    """Kept for the checkpoint layout; EDTalk renders without noise, so this is the identity."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return x if noise is None else x + self.weight * noise


class ConstantInput(nn.Module):
    """Learned constant ``[1,C,4,4]`` repeated over the batch."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated convolution + (no) noise + fused leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x, style))


class ToRGB(nn.Module):
    """Features -> RGB residual, accumulated over resolutions (``skip`` is upsampled and added)."""

    def __init__(self, in_channels: int, upsample: bool = True, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ConvLayer(in_channels, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ToFlow(nn.Module):
    """Predicts a flow field and a mask at one resolution and warps the source features with them.

    ``forward(x [B,C,H,W], style [B,D], feat [B|1,C,H,W], skip)`` returns
    ``(warped [B,C,H,W], blended [B,C,H,W], raw [B,3,H,W])``: ``warped`` is the source feature map
    sampled at ``grid + tanh(flow)`` (bilinear, zero padding, ``align_corners=False``) times
    ``sigmoid(mask)``; ``blended`` mixes it with ``x``; ``raw`` is passed (upsampled) to the next
    resolution.
    """

    def __init__(self, in_channels: int, style_dim: int, resolution: int,
                 blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        xs = torch.linspace(-1, 1, resolution, dtype=torch.float64)
        gy, gx = torch.meshgrid(xs, xs, indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy], dim=-1)[None].float(), persistent=False)

    def forward(self, x: torch.Tensor, style: torch.Tensor, feat: torch.Tensor,
                skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        flow = torch.tanh(out[:, 0:2]).permute(0, 2, 3, 1) + self.grid.to(out.dtype)
        mask = torch.sigmoid(out[:, 2:3])
        if feat.shape[0] != flow.shape[0]:
            feat = feat.expand(flow.shape[0], -1, -1, -1)
        warped = F.grid_sample(feat, flow, mode="bilinear", padding_mode="zeros", align_corners=False) * mask
        return warped, warped + x * (1.0 - mask), out


class ADAIN(nn.Module):
    """Instance norm whose scale and shift come from a latent vector: ``x [B,C,H,W], z [B,D]``."""

    def __init__(self, channels: int, feature_dim: int, hidden: int = 128):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(channels, affine=False)
        self.mlp_shared = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU())
        self.mlp_gamma = nn.Linear(hidden, channels)
        self.mlp_beta = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.mlp_shared(z.reshape(z.shape[0], -1))
        gamma = self.mlp_gamma(h)[:, :, None, None]
        beta = self.mlp_beta(h)[:, :, None, None]
        return self.param_free_norm(x) * (1 + gamma) + beta


class EEM(nn.Module):
    """Expression embedding module: modulates a source feature map with the expression latent.

    ``x [B,C,H,W], z [B,D] -> [B,C,H,W]``. The published block computes a first branch
    (``conv1``/``norm1``) whose result is discarded; only ``x + norm2(conv2(x), z)`` reaches the
    output, so only that is computed here. ``conv1``/``norm1`` stay for the checkpoint layout.
    """

    def __init__(self, channels: int, feature_dim: int, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.norm1 = ADAIN(channels, feature_dim, hidden)
        self.norm2 = ADAIN(channels, feature_dim, hidden)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if z is None:
            return x
        if x.shape[0] == 1 and z.shape[0] > 1:
            x = x.expand(z.shape[0], -1, -1, -1)
        return x + self.norm2(self.conv2(x), z)
