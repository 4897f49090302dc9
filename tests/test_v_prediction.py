"""The ``"v"`` prediction type (Salimans & Ho's v = alpha eps - beta x0, diffusers' v_prediction) through sampling
and training: the exact v field of a Gaussian mixture samples as its exact eps field does (the conversions are
affine), CFG rescale acts on v, and the loss at v is the MSE against alpha eps - beta z."""

import pytest
import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel
from fastdiff.ops import add_noise, diffusion_loss


def _mixture():
    return GaussianMixture(torch.tensor([[2.0, -1.0], [-1.5, 0.5]]), stds=torch.tensor([0.4, 0.6]))


@pytest.mark.parametrize("path", ["vp", "vp-cosine", "condot"])
@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "euler", "heun"])
def test_a_v_model_samples_as_the_eps_model_of_the_same_field(path, method):
    mix = _mixture()
    # one grid for both (an eps model's default grid starts at t = 1e-3 where alpha_0 = 0; a v model's at 0)
    grid = [1e-3 + (1.0 - 1e-3) * i / 24 for i in range(25)]
    kw = dict(shape=(2,), batch_size=64, seed=3, path=path, method=method, timesteps=grid)
    eps = fastdiff.sample(MixtureModel(mix, path, "eps"), None, prediction="eps", **kw)
    v = fastdiff.sample(MixtureModel(mix, path, "v"), None, prediction="v", **kw)
    torch.testing.assert_close(v, eps, rtol=2e-4, atol=2e-4)


def test_guidance_rescale_acts_on_v():
    """With prediction="v" the CFG blend and its rescale take the v outputs themselves: the step is the one of
    diffusers' rescale_noise_cfg applied to v (checked through the fused step's result against the reference)."""
    from fastdiff.sampling.features.guidance import rescale_reference

    def model(x, t, y):  # two branches of a v model that differ per label
        return torch.tanh(x) * (1.0 + y.float().view(-1, 1))

    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(path="vp", prediction="v", method="ddim", noise=x0, y=torch.ones(4), null_y=torch.zeros(4),
              cfg=5.0, timesteps=[0.3, 0.6])
    got = fastdiff.sample(model, None, guidance_rescale=0.7, **kw)
    p_null = model(x0, None, torch.zeros(4))
    p_y = model(x0, None, torch.ones(4))
    g = rescale_reference(p_null, p_y, 5.0, 0.7).float()
    step = fastdiff.sample(lambda x, t, y: g, None, path="vp", prediction="v", method="ddim", noise=x0,
                           timesteps=[0.3, 0.6])
    torch.testing.assert_close(got, step, rtol=1e-5, atol=1e-5)


def test_the_v_loss_is_the_mse_against_alpha_eps_minus_beta_z():
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    t = torch.rand(6, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    seeds = torch.arange(6)
    path = fastdiff.paths.get_path("vp")
    al, be = (c.view(-1, 1) for c in path.coefficients(t.double())[:2])
    x = add_noise(z, t, seeds, 7, path="vp")
    eps = (x.double() - al * z.double()) / be
    pred = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    loss = diffusion_loss(pred, z, t, seeds, 7, path="vp", prediction="v", reduction="none")
    want = ((pred.double() - (al * eps - be * z.double())) ** 2).mean(dim=1)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    assert pred.grad is not None and pred.grad.isfinite().all()
