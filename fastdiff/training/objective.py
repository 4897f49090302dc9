"""The training objective: time sampling, loss weighting and CFG label dropout around the fused loss.

Every random choice of a training step is a pure function of the sample's seed (docs/design.md §3), so a
step is reproduced from (seed, step) alone — on any backend, any number of processes, after a resume.
Stream ids of training (documented in docs/training.md):

    STREAM_EPS = 0            ε of x_t = α_t z + β_t ε (element i of the sample)
    STREAM_TIME = 1           t: uniform u from the first Philox word, or logit-normal from the first normal
    STREAM_LABEL_DROPOUT = 2  the label of sample b is replaced by null_y when u < p

Uniforms are u(w0) = ((w0 >> 8) + 0.5) · 2⁻²⁴ of Philox4x32-10 with key = seed and counter = (0, 0, k, 0),
the same word the spec-v1 normal of element 0 starts from; they are exact integer arithmetic, so t and
the dropout mask are bit-identical on every device.
"""

from __future__ import annotations

import torch

from fastdiff import _checks
from fastdiff.ops.diffusion_loss import add_noise, diffusion_loss
from fastdiff.ops.philox import M32, philox_rounds
from fastdiff.ops.randn import randn_reference
from fastdiff.paths import check_prediction, get_path

STREAM_EPS = 0
STREAM_TIME = 1
STREAM_LABEL_DROPOUT = 2

TIME_SAMPLING = ("uniform", "logit_normal", "levels")
WEIGHTING = ("none", "min_snr", "ncsn")

SEED_SHIFT = 40  # training sample n of run seed s uses the 64-bit seed (s << 40) + n


def training_seeds(seed: int, first: int, count: int, device=None) -> torch.Tensor:
    """Seeds of the training samples ``first … first + count − 1`` of a run (int64 [count]).

    Sample n (n = step × global batch + position in the global batch) gets ``(seed << 40) + n``, so
    runs with different seeds never share noise for the first 2⁴⁰ samples, and a rank of a DDP job
    draws exactly the noise that one process would for the same global batch.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << (63 - SEED_SHIFT):
        raise ValueError(f"seed must be an int in [0, 2^{63 - SEED_SHIFT}), got {seed!r}")
    if first < 0 or first + count > 1 << SEED_SHIFT:
        raise ValueError(f"training sample index {first + count} exceeds 2^{SEED_SHIFT}")
    return torch.arange(count, dtype=torch.int64, device=device) + ((seed << SEED_SHIFT) + first)


def uniforms(seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """One exact uniform in (0, 1) per seed, float64 [B]: u(w0) of Philox(key = seed, counter = (0, 0, k, 0))."""
    seeds = _checks.seeds_tensor(seeds)
    stream = _checks.stream_id(stream)
    zeros = torch.zeros_like(seeds)
    w0 = philox_rounds(zeros, zeros, zeros + stream, zeros, seeds & M32, (seeds >> 32) & M32)[0]
    return ((w0 >> 8).to(torch.float64) + 0.5) * 2.0**-24


def _x0_gain(prediction: str, al, be, dal, dbe):
    """c = ∂ẑ/∂pred: how an error in the prediction shows up in the x0 estimate."""
    if prediction == "x0":
        return torch.ones_like(al)
    if prediction == "eps":
        return be / al
    if prediction == "score":
        return be * be / al
    if prediction == "v":  # ẑ = (α x − β v) / (α² + β²)
        return be / (al * al + be * be)
    return be / (be * dal - dbe * al)  # velocity: ẑ = (β u − β̇ x) / Δ


def _score_gain(prediction: str, al, be, dal, dbe):
    """∂s/∂pred: how an error in the prediction shows up in the score estimate s = −ε̂/β."""
    if prediction == "score":
        return torch.ones_like(al)
    if prediction == "eps":
        return -1.0 / be
    if prediction == "x0":
        return al / (be * be)  # s = (α ẑ − x) / β²
    if prediction == "v":  # ε̂ = (β x + α v) / (α² + β²)
        return -al / (be * (al * al + be * be))
    return al / (be * (be * dal - dbe * al))  # velocity: ε̂ = (α̇ x − α u) / Δ


class DiffusionObjective:
    """What a training step minimises: E_t w(t) ‖pred(x_t, t, y) − target‖² with x_t = α_t z + β_t ε.

    Args:
        path, prediction: the Gaussian path and what the model predicts ("velocity", "eps", "score", "x0").
        time_sampling: "uniform" (t ~ U(0, 1)), "logit_normal" (t = sigmoid(m + s n), n ~ N(0, 1),
            ``logit_mean`` m, ``logit_std`` s; SD3's choice with m = 0, s = 1) or "levels" (one of the flow times
            ``levels``, uniformly: NCSN's noise levels; fastdiff.training.ncsn_objective).
        weighting: "none" or "min_snr": min-SNR-γ (Hang et al. 2023) defined on the x0 error,
            w = min(SNR, γ) · (∂ẑ/∂pred)², SNR = α²/β². It gives min(SNR, γ)/SNR for eps, min(SNR, γ)
            for x0, min(SNR, γ)/(SNR + 1) for VP v-prediction, and keeps score training finite near
            t = 1 (where the score target −ε/β blows up). "ncsn": NCSN's λ(σ) = σ² on the score error,
            w = β² (∂s/∂pred)²: ‖β s + ε‖² for a score model, the plain loss for an eps model.
        label_dropout: probability p of replacing a sample's label by ``null_y`` (classifier-free
            guidance training); ``null_y`` defaults to the model's ``null_label`` attribute.
        backend: backend of the fused ops (None: the one in force).
    """

    def __init__(self, path="condot", prediction: str = "velocity", *, time_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, weighting: str = "none",
                 snr_gamma: float = 5.0, label_dropout: float = 0.0, null_y=None, levels=None, backend=None):
        self.path = get_path(path)
        self.prediction = check_prediction(prediction)
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLING}, got {time_sampling!r}")
        if weighting not in WEIGHTING:
            raise ValueError(f"weighting must be one of {WEIGHTING}, got {weighting!r}")
        # _checks.real: math.isfinite('0.1') would fail with a TypeError that names no argument
        logit_mean = _checks.real("logit_mean", logit_mean)
        logit_std = _checks.real("logit_std", logit_std, lo=0.0, lo_open=True)
        snr_gamma = _checks.real("snr_gamma", snr_gamma, lo=0.0, lo_open=True)
        label_dropout = _checks.real("label_dropout", label_dropout, lo=0.0, hi=1.0, hi_open=True)
        if (levels is None) != (time_sampling != "levels"):
            raise ValueError('levels (the flow times to train at) go with time_sampling="levels", and it needs them')
        if levels is not None:
            levels = levels.tolist() if isinstance(levels, torch.Tensor) else levels
            levels = [_checks.real(f"levels[{i}]", v) for i, v in enumerate(levels)]
            if not levels or not all(0.0 < v < 1.0 for v in levels):
                raise ValueError(f"levels must be flow times in (0, 1), got {levels}")
        self.levels = levels
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)
        self.weighting, self.snr_gamma = weighting, float(snr_gamma)
        self.label_dropout, self.null_y, self.backend = float(label_dropout), null_y, backend

    def config(self) -> dict:
        """JSON-serializable settings (stored in checkpoints)."""
        null_y = self.null_y.tolist() if isinstance(self.null_y, torch.Tensor) else self.null_y
        # a named path with other parameters (VE(sigma_max=2), NCSN's) is recorded by its repr, not its name
        name = getattr(self.path, "name", None)
        path = name if name and repr(get_path(name)) == repr(self.path) else repr(self.path)
        return {"path": path, "prediction": self.prediction,
                "time_sampling": self.time_sampling, "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "weighting": self.weighting, "snr_gamma": self.snr_gamma, "label_dropout": self.label_dropout,
                "null_y": null_y, **({"levels": self.levels} if self.levels is not None else {})}

    def __repr__(self) -> str:
        return "DiffusionObjective(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    # ---- the pieces, each a pure function of the seeds ------------------------------------------

    def sample_t(self, seeds: torch.Tensor) -> torch.Tensor:
        """Training times [B] (float64, in the open interval (0, 1))."""
        if self.time_sampling == "uniform":
            return uniforms(seeds, STREAM_TIME)
        if self.time_sampling == "levels":
            i = (uniforms(seeds, STREAM_TIME) * len(self.levels)).long().clamp(max=len(self.levels) - 1)
            return torch.tensor(self.levels, dtype=torch.float64)[i]
        n = randn_reference(seeds, STREAM_TIME, (1,), dtype=torch.float64)[:, 0]
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def weights(self, t: torch.Tensor):
        """Per-sample loss weights [B] (float32) or None for "none"."""
        if self.weighting == "none":
            return None
        al, be, dal, dbe = self.path.coefficients(t)
        if self.weighting == "ncsn":
            return (be * _score_gain(self.prediction, al, be, dal, dbe)).square().to(torch.float32)
        snr = (al / be) ** 2
        gain = _x0_gain(self.prediction, al, be, dal, dbe)
        return (torch.clamp(snr, max=self.snr_gamma) * gain * gain).to(torch.float32)

    def drop_labels(self, y, seeds: torch.Tensor, null_y=None):
        """y with each sample's label replaced by ``null_y`` with probability ``label_dropout``."""
        if self.label_dropout == 0.0 or y is None:
            return y
        null_y = self.null_y if null_y is None else null_y
        if null_y is None:
            raise ValueError("label_dropout > 0 needs null_y (or a model with a null_label attribute)")
        drop = (uniforms(seeds, STREAM_LABEL_DROPOUT) < self.label_dropout).to(y.device)
        null = torch.as_tensor(null_y, dtype=y.dtype, device=y.device)
        return torch.where(drop.view(-1, *([1] * (y.dim() - 1))), null, y)

    # ---- the loss --------------------------------------------------------------------------------

    def __call__(self, model, z: torch.Tensor, y, seeds: torch.Tensor, *, reduction: str = "mean",
                 autocast_dtype=None) -> torch.Tensor:
        """Loss of ``model(x_t, t, y)`` on the clean batch ``z`` [B, ...] with per-sample ``seeds`` [B]."""
        if not isinstance(z, torch.Tensor) or z.dim() < 1:
            raise TypeError("z must be a tensor [B, ...] (the clean data batch)")
        seeds = _checks.seeds_tensor(seeds)
        if seeds.shape != (z.shape[0],):
            raise ValueError(f"seeds must hold one seed per sample ({z.shape[0]}), got shape {tuple(seeds.shape)}")
        host_seeds = seeds.cpu()
        t = self.sample_t(host_seeds).to(z.device)
        seeds = seeds.to(z.device)
        null_y = self.null_y if self.null_y is not None else getattr(_unwrap(model), "null_label", None)
        y = self.drop_labels(y, host_seeds, null_y)
        x_t = add_noise(z, t, seeds, STREAM_EPS, self.path, backend=self.backend)
        with torch.autocast(z.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            pred = model(x_t, t.to(torch.float32), y)
        if pred.shape != z.shape:
            raise ValueError(f"the model returned shape {tuple(pred.shape)} for inputs of shape {tuple(z.shape)}")
        return diffusion_loss(pred, z, t, seeds, STREAM_EPS, self.path, self.prediction,
                              weight=self.weights(t), reduction=reduction, backend=self.backend)


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
