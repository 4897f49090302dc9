"""fastdiff.evaluation: the Fréchet distance against scipy's matrix square root, precision / recall on sets whose
answer is known, evaluation of a generated folder with a small local extractor, and the Inception adapter's
glue (with a stand-in for torch-fidelity, whose weights download at run time)."""

import sys
import types

import pytest
import torch

import fastdiff
from fastdiff.evaluation import evaluate, extract, frechet_distance, inception_features, precision_recall


def _gaussian(n, mean, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ scale.double().T + torch.tensor(mean)


def test_frechet_distance_is_the_formula():
    linalg = pytest.importorskip("scipy.linalg")
    a = _gaussian(500, [0.0, 1.0, 2.0], torch.tensor([[1.0, 0, 0], [0.5, 1.0, 0], [0, 0.3, 0.4]]), 0)
    b = _gaussian(400, [1.0, 0.0, 2.5], torch.tensor([[0.7, 0, 0], [0, 1.5, 0], [0.2, 0, 1.0]]), 1)
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    root = linalg.sqrtm(ca @ cb).real
    want = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float(ca.trace() + cb.trace() - 2 * root.trace())
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_precision_recall_on_known_sets():
    two_modes = torch.cat([_gaussian(300, [-5.0, 0.0], torch.eye(2), 0), _gaussian(300, [5.0, 0.0], torch.eye(2), 1)])
    assert precision_recall(two_modes, two_modes) == (1.0, 1.0)
    far = _gaussian(200, [50.0, 50.0], torch.eye(2), 2)
    assert precision_recall(far, two_modes) == (0.0, 0.0)
    one_mode = _gaussian(300, [-5.0, 0.0], torch.eye(2), 3)  # mode collapse: precise, half the recall
    precision, recall = precision_recall(one_mode, two_modes)
    assert precision > 0.95 and 0.4 < recall < 0.6
    with pytest.raises(ValueError, match="k must be an int"):
        precision_recall(far, two_modes, k=0)


def test_evaluate_a_generated_folder_with_a_local_extractor(tmp_path):
    """A folder written by fastdiff.generate against a tensor of reference samples, over a small fixed network's
    features (the shape Inception's features have in real use): the numbers are those of the feature sets."""
    from fastdiff.mixtures import MixtureModel, ring_mixture

    mix = ring_mixture()
    fastdiff.generate(MixtureModel(mix), 64, tmp_path, shape=(2,), steps=8, method="heun", batch_size=32,
                      progress=False)
    reference = mix.sample(80, torch.Generator().manual_seed(0))[0].float()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    result = evaluate(tmp_path, reference, features=net, k=3, batch_size=16)
    g = extract(net, fastdiff.load_generated(tmp_path)["x"])
    r = extract(net, reference)
    assert result["frechet_distance"] == pytest.approx(frechet_distance(g, r))
    assert (result["precision"], result["recall"]) == precision_recall(g, r, 3)
    assert (result["n_generated"], result["n_reference"], result["feature_dim"]) == (64, 80, 4)
    # the exact field sampled well: near the data, far from noise
    noise = evaluate(torch.randn(64, 2) * 4, reference, features=net)
    assert result["frechet_distance"] < noise["frechet_distance"]
    with pytest.raises(TypeError, match="generated must be a tensor"):
        evaluate(3, reference)


def test_inception_adapter_feeds_uint8_rgb_to_torch_fidelity(monkeypatch):
    seen = {}

    class Extractor(torch.nn.Module):  # torch-fidelity's FeatureExtractorInceptionV3, as the adapter calls it
        def __init__(self, name, features_list):
            super().__init__()
            seen["args"] = (name, features_list)

        def forward(self, x):
            seen["input"] = x
            return (x.double().mean((2, 3)).repeat(1, 4),)

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = Extractor
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    features = inception_features()
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    f = features(x)
    assert seen["args"] == ("inception-v3-compat", ["2048"])
    assert seen["input"].dtype == torch.uint8 and seen["input"].shape == (1, 3, 2, 2)
    assert seen["input"][0, 0].flatten().tolist() == [0, 128, 255, 255] and f.shape == (1, 12)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_features()

