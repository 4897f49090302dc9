"""Conditioning as a tree (fastdiff/sampling/core/labels.py): y, null_y and conditions as dicts / tuples of label
batches, as SDXL's added_cond_kwargs and Flux's pooled projections and ids are. The oracle is the same model on
the same numbers packed into one tensor (the workaround users wrote by hand): every guided form, refills of a
reused plan and of a captured loop, and the errors, named by the leaf."""

import pytest
import torch

import fastdiff
from fastdiff.sampling.core import labels

B, C, L = 3, 4, 5
W = torch.randn(C, 6, generator=torch.Generator().manual_seed(0))


def tree_model(seen=None):
    """An SDXL-shaped model: y = {"emb": [B, L, C], "added": {"text_embeds": [B, C], "time_ids": [B, 6]}}."""
    def model(x, t, y):
        if seen is not None:
            seen.append((sorted(y), sorted(y["added"]), y["emb"].shape[0], y["added"]["time_ids"].shape[0]))
        e = y["emb"].mean(1) + y["added"]["text_embeds"] + y["added"]["time_ids"] @ W.T
        return -x + e[:, :, None] * t[:, None, None]
    return model


def packed_model(x, t, y):
    """The same model on the leaves packed into one tensor [B, L C + C + 6]."""
    emb, te, ids = y[:, :L * C].view(-1, L, C), y[:, L * C:L * C + C], y[:, L * C + C:]
    e = emb.mean(1) + te + ids @ W.T
    return -x + e[:, :, None] * t[:, None, None]


def pack(tree, batch):
    emb, te, ids = tree["emb"], tree["added"]["text_embeds"], tree["added"]["time_ids"]
    return torch.cat([emb.expand(batch, L, C).reshape(batch, -1), te.expand(batch, C), ids.expand(batch, 6)], 1)


def _trees(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(1, 6, generator=g)  # one row for the batch, as diffusers' add_time_ids
    y = {"emb": torch.randn(B, L, C, generator=g), "added": {"text_embeds": torch.randn(B, C, generator=g),
                                                             "time_ids": ids}}
    null = {"emb": torch.zeros(1, L, C), "added": {"text_embeds": torch.zeros(1, C), "time_ids": ids}}
    return y, null


@pytest.mark.parametrize("method,extra", [("euler", {}), ("dpmpp_2m", {}), ("heun", {}),
                                          ("euler", {"guidance": "apg"}), ("euler", {"guidance_rescale": 0.7}),
                                          ("ddim", {"eta": 0.5})])
@pytest.mark.parametrize("cfg_batch", [True, False])
def test_a_dict_y_samples_as_the_same_numbers_packed_in_one_tensor(method, extra, cfg_batch):
    y, null = _trees()
    kw = dict(steps=8, cfg=3.0, shape=(C, 2), seed=4, method=method, cfg_batch=cfg_batch, **extra)
    got = fastdiff.sample(tree_model(), y=y, null_y=null, **kw)
    want = fastdiff.sample(packed_model, y=pack(y, B), null_y=pack(null, B), **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_model_receives_the_structure_batched_or_per_branch():
    y, null = _trees()
    for cfg_batch, rows in ((True, 2 * B), (False, B)):
        seen = []
        fastdiff.sample(tree_model(seen), steps=3, cfg=2.0, y=y, null_y=null, shape=(C, 2), cfg_batch=cfg_batch)
        assert seen and all(s == (["added", "emb"], ["text_embeds", "time_ids"], rows, rows) for s in seen), seen[:2]


def test_a_tuple_y_is_one_structure_not_three_samples():
    """Flux-like (prompt_embeds, pooled_projections): two samples, not len(y) = 2 labels by accident of B."""
    g = torch.Generator().manual_seed(2)
    emb, pooled = torch.randn(2, L, C, generator=g), torch.randn(2, C, generator=g)

    def model(x, t, y):
        e, p = y
        return -x + (e.mean(1) + p)[:, :, None] * t[:, None, None]

    null = (torch.zeros(1, L, C), torch.zeros(1, C))
    out = fastdiff.sample(model, steps=6, cfg=2.5, y=(emb, pooled), null_y=null, shape=(C, 3), seed=1)
    assert out.shape == (2, C, 3)
    three = (emb[:1].expand(3, L, C), pooled[:1].expand(3, C), torch.zeros(3, C))
    with pytest.raises(ValueError, match=r"y\[2\].*|inconsistent batch sizes"):
        fastdiff.sample(model, steps=6, y=three, shape=(C, 3), batch_size=2)


def test_a_batch_one_negative_embedding_is_broadcast():
    """diffusers' one negative prompt embedding [1, 77, C] for B prompts (refused before)."""
    g = torch.Generator().manual_seed(3)
    y, neg = torch.randn(B, 7, C, generator=g), torch.randn(1, 7, C, generator=g)

    def model(x, t, y):
        return -x + y.mean(1)[:, :, None] * t[:, None, None]

    got = fastdiff.sample(model, steps=5, cfg=4.0, y=y, null_y=neg, shape=(C, 2), seed=2)
    want = fastdiff.sample(model, steps=5, cfg=4.0, y=y, null_y=neg.expand(B, 7, C), shape=(C, 2), seed=2)
    assert torch.equal(got, want)


def test_a_reused_sampler_and_the_plan_cache_refill_every_leaf():
    y, null = _trees()
    y2 = {"emb": y["emb"] * 2, "added": {"text_embeds": -y["added"]["text_embeds"], "time_ids": y["added"]["time_ids"]}}
    kw = dict(steps=6, cfg=3.0, null_y=null, shape=(C, 2))
    sampler = fastdiff.Sampler(tree_model(), y=y, **kw)
    first, second = sampler(seed=5), sampler(seed=5, y=y2)
    assert torch.equal(first, fastdiff.sample(tree_model(), y=y, seed=5, **kw))
    assert torch.equal(second, fastdiff.sample(tree_model(), y=y2, seed=5, **kw))
    assert not torch.equal(first, second)
    model = tree_model()  # one model object: the second call reuses the first one's plan (plan_cache)
    a = fastdiff.sample(model, y=y, seed=5, **kw)
    b = fastdiff.sample(model, y=y2, seed=5, **kw)
    assert torch.equal(a, first) and torch.equal(b, second)


def test_several_conditions_as_trees():
    y, null = _trees()
    y2, _ = _trees(seed=9)
    kw = dict(steps=5, cfg=[2.0, 1.5], shape=(C, 2), seed=3)
    got = fastdiff.sample(tree_model(), conditions=[y, y2], null_y=null, **kw)
    want = fastdiff.sample(packed_model, conditions=[pack(y, B), pack(y2, B)], null_y=pack(null, B), **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_captured_loop_refills_every_leaf(recorder):
    y, null = _trees()
    y2, _ = _trees(seed=7)
    y2["added"]["time_ids"] = y["added"]["time_ids"]
    kw = dict(steps=6, cfg=3.0, null_y=null, shape=(C, 2), seed=8,
              backend="cpu" if fastdiff.backends()["cpu"] else "reference")
    model = tree_model()
    for tree in (y, y2, y):
        got = fastdiff.sample(model, y=tree, cuda_graph=True, **kw)
        assert torch.equal(got, fastdiff.sample(model, y=tree, **kw))
    assert recorder.captures == 1 and recorder.replays == 3


@pytest.mark.parametrize("make,exc,match", [
    (lambda y, n: dict(y={"a": torch.zeros(3, 2), "b": torch.zeros(2, 2)}), ValueError,
     r"the tensors of y must share one batch size .*y\['a'\]: 3, y\['b'\]: 2"),
    (lambda y, n: dict(y={"a": torch.zeros(())}), ValueError, r"y\['a'\] must be batched on dim 0"),
    (lambda y, n: dict(y=y, null_y={"emb": n["emb"]}), ValueError, "null_y must have y's structure"),
    (lambda y, n: dict(y=y, null_y=torch.zeros(1, 4)), TypeError, "null_y must have y's structure"),
    (lambda y, n: dict(y=y, null_y={"emb": n["emb"], "added": {"text_embeds": torch.zeros(1, C + 1),
                                                               "time_ids": n["added"]["time_ids"]}}),
     ValueError, r"null_y\['added'\]\['text_embeds'\] must have y\['added'\]\['text_embeds'\]'s per-sample shape"),
    (lambda y, n: dict(y={**y, "scale": 1.0}, null_y={**n, "scale": 0.0}), ValueError,
     r"the constant y\['scale'\] = 1.0 differs between branches"),
    (lambda y, n: dict(y=y, null_y=n, classifier=lambda x, t: x.flatten(1)), ValueError,
     "classifier guidance with a dict / tuple y: give classifier_y"),
])
def test_errors_name_the_leaf(make, exc, match):
    y, null = _trees()
    with pytest.raises(exc, match=match):
        fastdiff.sample(tree_model(), steps=3, cfg=2.0, shape=(C, 2), **make(y, null))


def test_lists_stay_per_sample_labels_and_tuples_of_numbers_too():
    assert not labels.is_tree([torch.zeros(2), torch.zeros(2)]) and not labels.is_tree((1, 2, 3))
    assert labels.is_tree((torch.zeros(2, 1), 1.0)) and labels.is_tree({"a": [1, 2]})
    seen = []

    def model(x, t, y):
        seen.append(y)
        return -x

    fastdiff.sample(model, steps=2, y=(3, 1), shape=(2,))
    assert seen and seen[0] == (3, 1)


def test_an_sdxl_unet_with_added_cond_kwargs_through_diffusers_model():
    """A tiny SDXL-style UNet2DConditionModel (text_time additional embeddings) called through DiffusersModel with a
    dict y: fastdiff.sample's DDIM with CFG equals the SDXL pipeline's loop (2B batch of [negative, positive],
    diffusers' DDIMScheduler) on the same initial latents; the negative embeddings come as one row [1, ...]."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.adapters.diffusers import DiffusersModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4, cross_attention_dim=16,
        norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(1)
    n, steps, scale = 2, 10, 5.0
    prompt, pooled = torch.randn(n, 7, 16, generator=g), torch.randn(n, 8, generator=g)
    neg, neg_pooled = torch.randn(1, 7, 16, generator=g), torch.randn(1, 8, generator=g)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    latents = torch.randn(n, 4, 8, 8, generator=g)
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    x = latents * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg.expand(n, 7, 16), prompt]),
                       added_cond_kwargs={"text_embeds": torch.cat([neg_pooled.expand(n, 8), pooled]),
                                          "time_ids": ids.expand(2 * n, 6)}).sample
            uncond, cond = out.chunk(2)
            x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
    model = DiffusersModel(unet, sched.config)
    y = {"encoder_hidden_states": prompt, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    null_y = {"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": ids}}
    with torch.no_grad():
        got = fastdiff.sample(model, None, cfg=scale, y=y, null_y=null_y, noise=latents, path=model.path,
                              prediction=model.prediction, method="ddim", timesteps=model.ddim_timesteps(steps))
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    with pytest.raises(ValueError, match=r"y's keys \['prompt'\] are not conditioning parameters"):
        fastdiff.sample(model, 2, y={"prompt": prompt}, noise=latents, path=model.path, prediction=model.prediction)
