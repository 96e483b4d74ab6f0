"""EDM's non-leaky geometric augmentation with augmentation labels (Karras et al. 2022, App. F.2).

`AugmentPipe(p)` with the defaults below is EDM's training configuration
(`AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)`): an x-flip
(always drawn when p > 0, since 1e8·p ≥ 1), a y-flip, isotropic scaling, arbitrary rotation, anisotropic
scaling and fractional translation, each with probability p (times its multiplier). The network is told
what was done through a (B, 9) label vector laid out as EDM's:

    [xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso·cos(r), aniso·sin(r), tx, ty]

so it learns the undistorted distribution ("non-leaky") and is sampled with all-zero labels. Integer
rotation and integer translation are available too (`rotate_int`, `translate_int`; off by default, as in
EDM's training; each adds 2 labels). Parameters are drawn in EDM's order from the global torch RNG of the
images' device, or from `generator`, so a saved RNG state replays them exactly.

Geometric transforms resample as EDM does: reflect-pad, 2× upsample with the sym6 wavelet low-pass,
bilinear `grid_sample` under the per-sample inverse affine matrix, filter and 2× downsample. Only samples
whose transform is not the identity are resampled, so p = 0 returns the input unchanged with zero labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Low-pass filter of the sym6 wavelet (its published decomposition coefficients).
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)


def _mat(a, b, c, d, e, f) -> torch.Tensor:
    """Batched 3×3 matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (N,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).reshape(*a.shape, 3, 3)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return _mat(one, zero, tx, zero, one, ty)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(sx)
    return _mat(sx, zero, zero, zero, sy, zero)


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    c, s, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    return _mat(c, -s, zero, s, c, zero)


def _const(*values: float, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


class AugmentPipe:
    """EDM geometric augmentation: `pipe(images)` → (augmented images, labels (B, label_dim) float32)."""

    def __init__(
        self,
        p: float = 0.12,
        *,
        xflip: float = 1e8,
        yflip: float = 1,
        scale: float = 1,
        rotate_frac: float = 1,
        aniso: float = 1,
        translate_frac: float = 1,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ):
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability must lie in [0, 1], got {p}")
        self.p = float(p)
        self.xflip, self.yflip, self.rotate_int, self.translate_int = map(
            float, (xflip, yflip, rotate_int, translate_int)
        )
        self.scale, self.rotate_frac, self.aniso, self.translate_frac = map(
            float, (scale, rotate_frac, aniso, translate_frac)
        )
        self.translate_int_max, self.scale_std, self.rotate_frac_max = translate_int_max, scale_std, rotate_frac_max
        self.aniso_std, self.aniso_rotate_prob, self.translate_frac_std = (
            aniso_std,
            aniso_rotate_prob,
            translate_frac_std,
        )

    @property
    def label_dim(self) -> int:
        """Length of the label vector (9 for EDM's configuration)."""
        sizes = [
            (self.xflip, 1),
            (self.yflip, 1),
            (self.rotate_int, 2),
            (self.translate_int, 2),
            (self.scale, 1),
            (self.rotate_frac, 2),
            (self.aniso, 2),
            (self.translate_frac, 2),
        ]
        return sum(n for mult, n in sizes if mult > 0)

    def __repr__(self) -> str:
        return f"AugmentPipe(p={self.p}, label_dim={self.label_dim})"

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images and their augmentation labels (N, label_dim): the pixel blits, then one resampling for
        the composed geometric transforms; every draw comes from `generator` in a fixed order."""
        n = images.shape[0]
        draw = _Draws(images.device, generator, self.p)
        images, labels = self._blit(images, draw)
        g_inv, more = self._geometric(n, images.shape[2], images.shape[3], draw)
        labels += more
        # 1e-6: rotate(-r) @ rotate(r) with no anisotropy is the identity up to rounding
        moved = (g_inv - torch.eye(3, device=images.device)).abs().amax(dim=(1, 2)) > 1e-6
        if bool(moved.any()):
            idx = moved.nonzero().squeeze(1)
            out = images.clone()
            out[idx] = _resample(images[idx].to(torch.float32), g_inv[idx]).to(images.dtype)
            images = out
        flat = [x.to(torch.float32).reshape(n, -1) for x in labels]
        return images, (torch.cat(flat, dim=1) if flat else torch.zeros(n, 0, device=images.device))

    def _blit(self, images: torch.Tensor, draw: _Draws) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pixel blitting (exact, no resampling): flips, quarter turns, integer translation; with their labels."""
        n, _, h, w = images.shape
        labels: list[torch.Tensor] = []
        if self.xflip > 0:
            f = draw.gate(draw.randint(2, n, 1, 1, 1), self.xflip, n, 1, 1, 1)
            images = torch.where(f == 1, images.flip(3), images)
            labels.append(f)
        if self.yflip > 0:
            f = draw.gate(draw.randint(2, n, 1, 1, 1), self.yflip, n, 1, 1, 1)
            images = torch.where(f == 1, images.flip(2), images)
            labels.append(f)
        if self.rotate_int > 0:
            k = draw.gate(draw.randint(4, n, 1, 1, 1), self.rotate_int, n, 1, 1, 1)
            images = torch.where((k == 1) | (k == 2), images.flip(3), images)
            images = torch.where((k == 2) | (k == 3), images.flip(2), images)
            images = torch.where((k == 1) | (k == 3), images.transpose(2, 3), images)
            labels += [(k == 1) | (k == 2), (k == 2) | (k == 3)]
        if self.translate_int > 0:
            t = draw.gate(draw.rand(2, n, 1, 1, 1) * 2 - 1, self.translate_int, 1, n, 1, 1, 1)
            tx = (t[0] * (w * self.translate_int_max)).round().to(torch.int64)
            ty = (t[1] * (h * self.translate_int_max)).round().to(torch.int64)
            images = _mirror_shift(images, tx.view(n, 1, 1), ty.view(n, 1, 1))
            labels += [tx / (w * self.translate_int_max), ty / (h * self.translate_int_max)]
        return images, labels

    def _geometric(self, n: int, h: int, w: int, draw: _Draws) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The per-sample inverse matrix (output → input pixel coordinates) of scaling, rotation, anisotropy and
        fractional translation, composed; with their labels."""
        g_inv = torch.eye(3, device=draw.device).expand(n, 3, 3)
        labels: list[torch.Tensor] = []
        if self.scale > 0:
            z = draw.gate(draw.randn(n), self.scale, n)
            s = torch.exp2(z * self.scale_std)
            g_inv = g_inv @ _scale(1 / s, 1 / s)
            labels.append(z)
        if self.rotate_frac > 0:
            theta = draw.gate((draw.rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac, n)
            g_inv = g_inv @ _rotate(theta)
            labels += [theta.cos() - 1, theta.sin()]
        if self.aniso > 0:
            z, r = draw.randn(n), (draw.rand(n) * 2 - 1) * math.pi
            z = torch.where(draw.rand(n) < self.aniso * self.p, z, torch.zeros_like(z))
            r = torch.where(draw.rand(n) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(z * self.aniso_std)
            g_inv = g_inv @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
            labels += [z * r.cos(), z * r.sin()]
        if self.translate_frac > 0:
            t = draw.gate(draw.randn(2, n), self.translate_frac, 1, n)
            g_inv = g_inv @ _translate(-t[0] * (w * self.translate_frac_std), -t[1] * (h * self.translate_frac_std))
            labels += [t[0], t[1]]
        return g_inv, labels


class _Draws:
    """The random draws of one augmentation call, all from one generator on the images' device."""

    def __init__(self, device: torch.device, generator: torch.Generator | None, p: float):
        self.device, self.generator, self.p = device, generator, p

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, device=self.device, generator=self.generator)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, device=self.device, generator=self.generator)

    def randint(self, high: int, *shape) -> torch.Tensor:
        return torch.randint(high, shape, device=self.device, generator=self.generator)

    def gate(self, value: torch.Tensor, mult: float, *shape) -> torch.Tensor:
        """`value` with probability mult·p, else zero (one uniform draw of `shape`)."""
        return torch.where(self.rand(*shape) < mult * self.p, value, torch.zeros_like(value))


def _mirror_shift(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Shift each image by integer (tx, ty), filling with its mirror image (EDM's integer translation)."""
    n, c, h, w = images.shape
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    sx = w - 1 - (w - 1 - (xs - tx) % (2 * w - 2)).abs()  # (n, 1, w)
    sy = h - 1 - (h - 1 - (ys + ty) % (2 * h - 2)).abs()  # (n, h, 1)
    flat = (sy * w + sx).reshape(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, flat).reshape(n, c, h, w)


def _resample(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Warp float images (n, C, H, W) by inverse matrices (n, 3, 3) in centred pixel coordinates, with
    reflect padding and 2× supersampling through the sym6 low-pass (alias-free resampling as in EDM)."""
    n, c, h, w = images.shape
    dev = images.device
    taps = torch.tensor(SYM6, dtype=images.dtype, device=dev)
    k = len(SYM6)
    pad_f = k // 4
    cx, cy = (w - 1) / 2, (h - 1) / 2

    # Reflect-pad just enough to cover where the output corners come from (plus the filter support).
    corners = _const(-cx, -cy, 1, cx, -cy, 1, cx, cy, 1, -cx, cy, 1, device=dev).view(4, 3).t()
    src = (g_inv @ corners)[:, :2, :].permute(1, 0, 2).reshape(2, -1)  # [xy, n·4]
    margin = torch.cat([-src, src]).amax(dim=1) + _const(pad_f * 2 - cx, pad_f * 2 - cy, device=dev).repeat(2)
    margin = margin.clamp(min=0).minimum(_const(w - 1, h - 1, device=dev).repeat(2))
    mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().tolist())
    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    one = torch.ones(n, device=dev)
    g_inv = _translate(one * (mx0 - mx1) / 2, one * (my0 - my1) / 2) @ g_inv

    # 2× upsample: zero insertion then the (reversed) low-pass, separably.
    up = taps.flip(0).view(1, 1, 1, k).expand(c, 1, 1, k)
    hp, wp = images.shape[2:]
    x = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(n, c, hp, 2 * wp)[..., :-1]
    x = F.conv2d(x, up, groups=c, padding=(0, (k + 1) // 2))
    x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(n, c, 2 * hp, x.shape[3])[:, :, :-1]
    x = F.conv2d(x, up.transpose(2, 3), groups=c, padding=((k + 1) // 2, 0))
    half = one * 0.5
    g_inv = _scale(one * 2, one * 2) @ g_inv @ _scale(half, half)
    g_inv = _translate(-half, -half) @ g_inv @ _translate(half, half)

    # Warp onto a supersampled canvas of the padded-by-filter output size (normalised coordinates).
    out_h, out_w = (h + pad_f * 2) * 2, (w + pad_f * 2) * 2
    g_inv = _scale(one * 2 / x.shape[3], one * 2 / x.shape[2]) @ g_inv @ _scale(one * out_w / 2, one * out_h / 2)
    grid = F.affine_grid(g_inv[:, :2, :], [n, c, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Low-pass, 2× downsample and crop the filter margin.
    down = taps.view(1, 1, 1, k).expand(c, 1, 1, k)
    x = F.conv2d(x, down, groups=c, stride=(1, 2), padding=(0, (k - 1) // 2))[:, :, :, pad_f:-pad_f]
    x = F.conv2d(x, down.transpose(2, 3), groups=c, stride=(2, 1), padding=((k - 1) // 2, 0))[:, :, pad_f:-pad_f]
    return x
