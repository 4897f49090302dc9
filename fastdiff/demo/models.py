"""Small denoisers for the demos and tests: :class:`MLP` (vectors) and :class:`UNet` (small images).

Both are called ``model(x, t, y=None)`` (docs/design.md §4): ``t`` is a float tensor [B] of flow times in
[0, 1] (0 noise, 1 data), ``y`` int64 class labels [B] or None. Label ``num_classes`` is the
null (unconditional) label, exposed as ``model.null_label``; ``y=None`` means null for every sample,
so classifier-free guidance uses ``null_y=model.null_label``. Untrained models predict ~0 (zero-init
output layer). ``model.config`` is a JSON-serializable dict and :func:`build` rebuilds the model
from it (checkpoints store the config next to the state dict); :func:`load_model` rebuilds one from
a :class:`fastdiff.training.Trainer` checkpoint.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MLP", "UNet", "FourierTime", "build", "load_model"]


# ---------------------------------------------------------------------- argument checks

def _int_arg(name: str, value, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_time_features(value) -> int:
    value = _int_arg("time_features", value, 2)
    if value % 2:
        raise ValueError(f"time_features must be even (sin and cos pairs), got {value}")
    return value


def _check_t(t, x: torch.Tensor) -> torch.Tensor:
    """t as a tensor [B] on x's device; a float or a 0-dim tensor is broadcast to the batch."""
    b = x.shape[0]
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return torch.full((b,), float(t), device=x.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a float tensor [B] of flow times, got {type(t).__name__}")
    if not t.is_floating_point():
        # Integer timesteps (0..999) are a different convention; flow time is a float in [0, 1].
        raise TypeError(f"t must be a floating-point tensor of flow times in [0, 1], got dtype {t.dtype}")
    if t.dim() == 0:
        return t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"t must have shape [B] = ({b},) to match x, got {tuple(t.shape)}")
    return t


def _check_y(y, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels as int64 [B] on x's device; None means the null label ``num_classes`` everywhere."""
    b = x.shape[0]
    if y is None:
        return torch.full((b,), num_classes, dtype=torch.long, device=x.device)
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        y = torch.full((b,), int(y), dtype=torch.long, device=x.device)
    else:
        y = torch.as_tensor(y, device=x.device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.dim() == 0:
            y = y.expand(b)
        if y.shape != (b,):
            raise ValueError(f"y must have shape [B] = ({b},) to match x, got {tuple(y.shape)}")
        y = y.long()
    # The range check reads y on the host; skip it while a CUDA graph is captured (no syncs there).
    if not (y.is_cuda and torch.cuda.is_current_stream_capturing()) and not torch.compiler.is_compiling():
        bad = (y < 0) | (y > num_classes)
        if bool(bad.any()):
            if num_classes == 0:
                raise ValueError(f"y must hold labels: this model is unconditional (num_classes=0), so y must "
                                 f"be None or the null label 0, got {int(y[bad][0])}")
            raise ValueError(f"y must hold labels in [0, {num_classes}) or the null label {num_classes}, "
                             f"got {int(y[bad][0])}")
    return y


# ---------------------------------------------------------------------- shared pieces

class FourierTime(nn.Module):
    """Sin/cos features of flow time t at log-spaced angular frequencies 1 .. ``max_freq``.

    The lowest frequency (1 rad per unit time) is monotone on [0, 1], the highest resolves
    differences of ~1/max_freq, so the whole interval is resolved without rescaling t.
    """

    def __init__(self, features: int, max_freq: float = 1000.0):
        super().__init__()
        half = features // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half))
        self.register_buffer("freqs", freqs, persistent=False)  # derived, not state

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float()[:, None] * self.freqs[None, :]  # float32 even for bf16/fp16 inputs
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class _Conditioning(nn.Module):
    """Embedding of (t, y): an MLP of the Fourier time features plus a learned label embedding."""

    def __init__(self, num_classes: int, time_features: int, dim: int):
        super().__init__()
        self.time = FourierTime(time_features)
        self.mlp = nn.Sequential(nn.Linear(time_features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)  # index num_classes: the null label
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, t, y) -> torch.Tensor:
        t = _check_t(t, x)
        y = _check_y(y, x, self.num_classes)
        feats = self.time(t).to(self.mlp[0].weight.dtype)  # model may be .double()/.half()
        return self.mlp(feats) + self.label(y)


class _Configurable(nn.Module):
    """Stores the constructor kwargs as a JSON-serializable ``config`` for :func:`build`."""

    def _set_config(self, **kwargs) -> None:
        self._config = {"type": type(self).__name__,
                        **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}

    @property
    def config(self) -> dict:
        return copy.deepcopy(self._config)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _check_x(self, x, ndim: int, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != ndim:
            raise ValueError(f"x must have shape {what}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


# ---------------------------------------------------------------------- MLP

class _MLPBlock(nn.Module):
    """Pre-norm residual block; the conditioning modulates the normalized input (scale, shift)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(emb).chunk(2, dim=-1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(F.silu(z))))


class MLP(_Configurable):
    """Residual MLP denoiser for vectors x [B, dim] (2-D toy data, mixtures).

    Args:
        dim: features per sample.
        num_classes: number of class labels (0: unconditional; y must then be None or the null label).
        hidden: width of the residual stream; depth: number of residual blocks;
        time_features: number of Fourier features of t (even).
    """

    def __init__(self, dim: int, num_classes: int = 0, hidden: int = 256, depth: int = 3,
                 time_features: int = 64):
        super().__init__()
        dim = _int_arg("dim", dim, 1)
        num_classes = _int_arg("num_classes", num_classes, 0)
        hidden = _int_arg("hidden", hidden, 1)
        depth = _int_arg("depth", depth, 1)
        time_features = _check_time_features(time_features)
        self._set_config(dim=dim, num_classes=num_classes, hidden=hidden, depth=depth,
                         time_features=time_features)
        self.dim, self.num_classes = dim, num_classes
        self.cond = _Conditioning(num_classes, time_features, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)  # an untrained model predicts 0
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        self._check_x(x, 2, f"[B, dim] = [B, {self.dim}]")
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, dim] = [B, {self.dim}], got {tuple(x.shape)}")
        emb = F.silu(self.cond(x, t, y))
        h = self.inp(x.to(self.inp.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).to(x.dtype)


# ---------------------------------------------------------------------- UNet

class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice; the conditioning scales and shifts the second norm."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.mod = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as (close to) its skip path
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.mod(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class _Attention(nn.Module):
    """Single-head self-attention over the pixels of the lowest resolution (residual)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(_Configurable):
    """Small UNet for images x [B, C, H, W] with H, W divisible by ``2 ** (len(mults) - 1)``.

    One residual block per resolution on the way down and up (with skip connections), one block
    (plus optional self-attention) at the lowest resolution. Level i has ``base * mults[i]``
    channels. Downsampling is a stride-2 conv; upsampling is nearest-neighbour after a 1x1 conv
    that reduces the channels at the low resolution (cheap at the high one). The conditioning
    (time MLP + label embedding, width ``4 * base``) scales and shifts every block.

    Args:
        channels: image channels C. num_classes: 0 for unconditional. base: channels of level 0.
        mults: channel multipliers per level. time_features: Fourier features of t (even).
        groups: GroupNorm groups (must divide every ``base * mult``). attention: self-attention at
        the lowest resolution.
    """

    def __init__(self, channels: int = 1, num_classes: int = 0, base: int = 32,
                 mults: Sequence[int] = (1, 2), time_features: int = 64, groups: int = 8,
                 attention: bool = False):
        super().__init__()
        channels = _int_arg("channels", channels, 1)
        num_classes = _int_arg("num_classes", num_classes, 0)
        base = _int_arg("base", base, 1)
        groups = _int_arg("groups", groups, 1)
        time_features = _check_time_features(time_features)
        if isinstance(mults, (str, bytes)) or not isinstance(mults, Sequence) or len(mults) == 0:
            raise TypeError(f"mults must be a non-empty sequence of ints, got {mults!r}")
        mults = tuple(_int_arg("mults[i]", m, 1) for m in mults)
        widths = [base * m for m in mults]
        if any(w % groups for w in widths):
            raise ValueError(f"groups={groups} must divide every level's channels base * mults = {widths}")
        if not isinstance(attention, bool):
            raise TypeError(f"attention must be a bool, got {type(attention).__name__}")
        self._set_config(channels=channels, num_classes=num_classes, base=base, mults=mults,
                         time_features=time_features, groups=groups, attention=attention)
        self.channels, self.num_classes = channels, num_classes
        self.factor = 2 ** (len(mults) - 1)
        emb = 4 * base
        self.cond = _Conditioning(num_classes, time_features, emb)
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.down.append(_ResBlock(prev, w, emb, groups))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            prev = w
        self.mid = _ResBlock(prev, prev, emb, groups)
        self.attn = _Attention(prev, groups) if attention else None
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(_ResBlock(prev + widths[i], widths[i], emb, groups))
            prev = widths[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(widths[i], widths[i - 1], 1))
                prev = widths[i - 1]
        self.out_norm = nn.GroupNorm(groups, widths[0])
        self.out = nn.Conv2d(widths[0], channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # an untrained model predicts 0
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        self._check_x(x, 4, f"[B, C, H, W] with C = {self.channels}")
        if x.shape[1] != self.channels or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x must have shape [B, C, H, W] with C = {self.channels} and H, W divisible "
                             f"by {self.factor} (2 ** (len(mults) - 1)), got {tuple(x.shape)}")
        emb = F.silu(self.cond(x, t, y))
        h = self.inp(x.to(self.inp.weight.dtype))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        for j, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsample):
                h = F.interpolate(self.upsample[j](h), scale_factor=2, mode="nearest")
        return self.out(F.silu(self.out_norm(h))).to(x.dtype)


# ---------------------------------------------------------------------- build

_MODELS = {"MLP": MLP, "UNet": UNet}


def build(config: dict) -> nn.Module:
    """The model described by ``config`` (a ``model.config`` dict: ``type`` plus constructor kwargs)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    kwargs = dict(config)
    kind = kwargs.pop("type", None)
    if kind not in _MODELS:
        raise ValueError(f"config['type'] must be one of {sorted(_MODELS)}, got {kind!r}")
    try:
        return _MODELS[kind](**kwargs)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"bad config for {kind}: {exc}") from exc
        raise


def load_model(path, *, ema: bool = True, device=None):
    """Rebuild a model of this module from a checkpoint (its .json, .safetensors or folder);
    returns ``(model, state)`` with the EMA weights by default, in eval mode."""
    from fastdiff.training import checkpoint as ckpt
    from fastdiff.training.checkpoint import CheckpointError

    tensors, state = ckpt.read(path)
    config = state.get("model_config")
    if not config:
        raise CheckpointError(f"checkpoint {path} has no model_config (the model was not a fastdiff.demo.models "
                              "model): build the model yourself and load the 'model/' or 'ema/' tensors")
    model = build(config)
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    if ema:
        weights.update({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # tensors that do not fit the recorded config
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model_config: {e}") from None
    return model.to(device or "cpu").eval(), state
