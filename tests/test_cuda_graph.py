"""fastdiff.sample(cuda_graph=True): captured loops keep alive what they read, the cache key identifies
what a capture baked in, the cache is bounded, and capture/replay happen on the sampling device.

On the CPU these run against tests/graph_recorder.py, a recording stand-in for capture and replay
that fails when a replay reads a tensor that has died, or when the capture copies host data or reads a
device value; with a GPU the same scenarios run on the real driver (marked cuda)."""

import contextlib
import gc

import pytest
import torch

import fastdiff
from fastdiff import paths
from fastdiff.sampling.core import graphs
from graph_recorder import CaptureViolation, ReplayOfFreedMemory, empty_cache

METHODS = [("euler", {"sigma": 0.5}), ("heun", {}), ("dpmpp_2m", {}), ("ddim", {"eta": 0.7}),
           ("dpmpp_3m_sde", {"eta": 0.8}),  # two history buffers and a draw per step
           ("dpmpp_sde", {"path": "ve", "prediction": "x0"}),  # a midpoint evaluation, two draws in one stage
           ("heun", {"s_churn": 2.0, "s_tmax": 50.0, "path": "ve", "prediction": "x0"})]  # churn in the last stage


class TimeModel(torch.nn.Module):
    """Reads x, t and y (when given), as real models do: each is an address a graph bakes in."""

    def __init__(self, dim=6, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.lin.weight.copy_(0.2 * torch.randn(dim, dim, generator=g))
        self.emb = torch.nn.Embedding(classes + 1, dim)

    def forward(self, x, t, y):
        out = self.lin(x) * (1.0 + t[:, None])
        if y is not None:
            out = out + self.emb(y)
        return out


def _kw(method, extra, **more):
    kw = dict(shape=(6,), batch_size=5, method=method, backend="cpu" if fastdiff.backends()["cpu"] else "reference")
    kw.update(extra)
    kw.update(more)
    return kw


@pytest.mark.parametrize("method,extra", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_replays_of_two_alternating_captures_read_only_live_tensors(recorder, method, extra):
    model = TimeModel()
    y = torch.tensor([0, 1, 2, 1, 0])
    configs = [_kw(method, extra, cfg=3.0, y=y, null_y=3), _kw(method, extra, steps=7)]
    for round_ in range(3):
        for cfg in configs:
            seed = 100 * round_ + 7
            got = fastdiff.sample(model, **{"steps": 9, **cfg}, seed=seed, cuda_graph=True)
            empty_cache()  # a second capture empties the allocator's cache: freed blocks go back
            want = fastdiff.sample(model, **{"steps": 9, **cfg}, seed=seed)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert recorder.captures == 2 and recorder.replays == 6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_capture_makes_no_host_copies_and_no_syncs(recorder, backend):
    if not fastdiff.backends()[backend]:
        pytest.skip(fastdiff.backends()[backend].reason)
    model = TimeModel()
    for method, extra in METHODS:
        fastdiff.sample(model, 6, **_kw(method, extra, backend=backend), cuda_graph=True)
    assert recorder.captures == len(METHODS)


def test_discrete_vp_coefficients_copy_the_table_once_per_device():
    from graph_recorder import HostDataRecorder

    path = paths.DiscreteVP(torch.linspace(0.99, 0.01, 50))
    t = torch.rand(8, dtype=torch.float64, device="meta")
    path.coefficients(t)  # the first call on a device copies the table there
    with HostDataRecorder() as rec:
        path.coefficients(t)
        path.coefficients(t)
    assert rec.seen == []


def test_schedules_with_the_same_repr_get_their_own_graphs(recorder):
    model = TimeModel()
    a = paths.DiscreteVP(torch.linspace(0.999, 0.01, 100))
    b = paths.DiscreteVP(torch.linspace(0.999, 0.2, 100) ** 2)
    assert repr(a) == repr(b)
    u1 = paths.UserPath(lambda t: t, lambda t: 1 - t, name="mine")
    u2 = paths.UserPath(lambda t: t, lambda t: (1 - t) * 2, name="mine")
    assert repr(u1) == repr(u2)
    for path in (a, b, u1, u2):
        kw = _kw("ddim", {}, path=path, prediction="eps")
        got = fastdiff.sample(model, 8, **kw, seed=3, cuda_graph=True)
        torch.testing.assert_close(got, fastdiff.sample(model, 8, **kw, seed=3), rtol=0, atol=0)
    assert recorder.captures == 4


def test_whether_y_is_given_is_part_of_the_key(recorder):
    model = TimeModel()
    kw = _kw("euler", {})
    plain = fastdiff.sample(model, 5, **kw, cuda_graph=True)
    y = torch.tensor([2, 2, 1, 0, 1])
    labelled = fastdiff.sample(model, 5, **kw, y=y, cuda_graph=True)
    torch.testing.assert_close(labelled, fastdiff.sample(model, 5, **kw, y=y), rtol=0, atol=0)
    assert not torch.equal(plain, labelled)
    assert recorder.captures == 2


def _model_of_kind(kind):
    module = TimeModel()
    if kind == "module":
        return module
    if kind == "function":
        return lambda x, t, y: module(x, t, y)
    return module.forward


@pytest.mark.parametrize("kind", ["module", "function", "bound method"])
def test_a_dead_models_graphs_are_dropped(recorder, kind):
    model = _model_of_kind(kind)
    fastdiff.sample(model, 4, **_kw("heun", {}), cuda_graph=True)
    assert len(graphs.CACHE) == 1
    del model
    gc.collect()
    # a new model may now get the dead one's id: no entry may be left to be replayed for it
    assert len(graphs.CACHE) == 0


def test_a_new_object_with_a_reused_id_never_replays_another_models_graph(recorder):
    first, second = TimeModel(seed=1), TimeModel(seed=2)
    kw = _kw("euler", {})
    fastdiff.sample(first, 4, **kw, cuda_graph=True)
    # forge the collision that id reuse after garbage collection produces
    (key, entry), = graphs.CACHE._entries.items()
    graphs.CACHE._entries[(id(second),) + key[1:]] = entry
    got = fastdiff.sample(second, 4, **kw, cuda_graph=True)
    torch.testing.assert_close(got, fastdiff.sample(second, 4, **kw), rtol=0, atol=0)
    assert recorder.captures == 2


def test_cache_is_bounded_least_recently_used_first(recorder):
    model = TimeModel()
    for steps in (3, 4, 5, 6):
        fastdiff.sample(model, steps, **_kw("euler", {}), cuda_graph=True)
    fastdiff.sample(model, 3, **_kw("euler", {}), cuda_graph=True)  # touch the oldest
    fastdiff.sample(model, 7, **_kw("euler", {}), cuda_graph=True)  # evicts steps=4
    assert len(graphs.CACHE) == graphs.CACHE.capacity == 4
    assert recorder.captures == 5
    fastdiff.sample(model, 3, **_kw("euler", {}), cuda_graph=True)
    assert recorder.captures == 5
    fastdiff.sample(model, 4, **_kw("euler", {}), cuda_graph=True)
    assert recorder.captures == 6
    fastdiff.clear_cuda_graphs()
    assert len(graphs.CACHE) == 0


def test_recorder_catches_a_replay_of_freed_memory(recorder):
    """The stand-in itself: a graph over a tensor nobody keeps fails on replay."""
    keep = {"x": torch.zeros(4)}
    graph = recorder.capture(lambda: keep["x"].add_(1.0), "cpu")
    recorder.replay(graph, "cpu")
    assert keep["x"].tolist() == [3.0] * 4  # warm-up, capture, replay
    del keep["x"]
    gc.collect()
    with pytest.raises(ReplayOfFreedMemory):
        recorder.replay(graph, "cpu")
    with pytest.raises(CaptureViolation, match="host"):
        recorder.capture(lambda: torch.zeros(2) + torch.tensor(1.0), "cpu")


# ---- device placement, with a fake torch.cuda that has two devices ---------------------------------

class FakeCuda:
    """Just enough of torch.cuda for CudaCapture, recording which device each action happens on."""

    def __init__(self):
        self.current = 0
        self.log = []
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = fake._index(device)
                fake.log.append(("stream", self.device))

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.log.append(("replay", fake.current))

        @contextlib.contextmanager
        def graph(g, stream=None, **kw):
            s = stream if stream is not None else Stream()  # torch's default stream: made on the current device
            fake.log.append(("capture stream", s.device))
            yield

        @contextlib.contextmanager
        def device(d):
            old, fake.current = fake.current, fake._index(d)
            try:
                yield
            finally:
                fake.current = old

        @contextlib.contextmanager
        def stream(s):
            yield

        self.Stream, self.CUDAGraph, self.graph, self.device, self.stream = Stream, CUDAGraph, graph, device, stream
        self.current_stream = lambda device=None: Stream(device)

    def _index(self, d):
        if d is None:
            return self.current
        d = torch.device(d)
        return self.current if d.index is None else d.index


def test_capture_and_replay_happen_on_the_sampling_device(monkeypatch):
    fake = FakeCuda()
    for name in ("Stream", "CUDAGraph", "graph", "device", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    runs = []
    cap = graphs.CudaCapture()
    graph = cap.capture(lambda: runs.append(fake.current), torch.device("cuda", 1))
    cap.replay(graph, torch.device("cuda", 1))
    assert fake.current == 0  # the caller's current device is restored
    assert runs == [1, 1]  # warm-up and capture run with cuda:1 current
    assert {d for _, d in fake.log} == {1}, fake.log


# ---- the real driver --------------------------------------------------------------------------------

def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")


@pytest.mark.cuda
@pytest.mark.parametrize("method,extra", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_cuda_two_captures_alternating_with_empty_cache(method, extra):
    _gpu()
    graphs.clear_cuda_graphs()
    model = TimeModel().cuda()
    y = torch.tensor([0, 1, 2, 1, 0], device="cuda")
    configs = [_kw(method, extra, cfg=3.0, y=y, null_y=3, device="cuda", backend="auto"),
               _kw(method, extra, steps=7, device="cuda", backend="auto")]
    for round_ in range(3):
        for cfg in configs:
            seed = 100 * round_ + 7
            got = fastdiff.sample(model, **{"steps": 9, **cfg}, seed=seed, cuda_graph=True)
            torch.cuda.empty_cache()
            want = fastdiff.sample(model, **{"steps": 9, **cfg}, seed=seed)
            torch.testing.assert_close(got, want)
    graphs.clear_cuda_graphs()


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_cuda_captured_step_caching(method):
    """Step caching in a real capture: the decision on the device, the branches CUDA graph conditional nodes
    (CUDAGraph.begin_capture_to_if_node): the eager loop's decisions and result, replayed for other seeds."""
    _gpu()
    from fastdiff.sampling.features.caching import AdaptiveCache, EasyCache

    graphs.clear_cuda_graphs()
    model = TimeModel().cuda()
    y = torch.tensor([0, 1, 2, 1, 0], device="cuda")
    for rule in (EasyCache(reuse_threshold=0.3, start_percent=0.0), AdaptiveCache(threshold=0.3, max_skips=2)):
        kw = _kw(method, {}, cfg=3.0, y=y, null_y=3, device="cuda", backend="auto", cache=rule)
        captured = fastdiff.Sampler(model, 20, **kw, cuda_graph=True)
        for seed in (1, 2):
            eager = fastdiff.Sampler(model, 20, **kw)
            want = eager(seed=seed)
            torch.testing.assert_close(captured(seed=seed), want, rtol=0, atol=2e-5 * want.abs().max().item())
            assert captured._plan.model_calls.report() == eager._plan.model_calls.report()
    graphs.clear_cuda_graphs()


@pytest.mark.cuda
def test_cuda_graph_on_a_non_current_device():
    _gpu()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    graphs.clear_cuda_graphs()
    model = TimeModel().to("cuda:1")
    kw = _kw("heun", {}, device="cuda:1", backend="auto")
    with torch.cuda.device(0):
        got = fastdiff.sample(model, 8, **kw, seed=5, cuda_graph=True)
        again = fastdiff.sample(model, 8, **kw, seed=6, cuda_graph=True)
    assert got.device == torch.device("cuda", 1)
    torch.testing.assert_close(got, fastdiff.sample(model, 8, **kw, seed=5))
    torch.testing.assert_close(again, fastdiff.sample(model, 8, **kw, seed=6))
    graphs.clear_cuda_graphs()


def test_churn_at_the_first_step_in_a_graph(recorder):
    """The first step's churn rides in the initial state's write (Stage.start_churn): refilled noise and
    seeds give the uncaptured loop's samples."""
    model = TimeModel()
    kw = _kw("heun", {"s_churn": 3.0, "path": "vp", "timesteps": [0.2, 0.5, 0.8, 1.0]})
    for seed in (1, 2):
        noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
        got = fastdiff.sample(model, None, **kw, seed=seed, noise=noise, cuda_graph=True)
        torch.testing.assert_close(got, fastdiff.sample(model, None, **kw, seed=seed, noise=noise), rtol=0, atol=0)
        got = fastdiff.sample(model, None, **kw, seed=seed, cuda_graph=True)
        torch.testing.assert_close(got, fastdiff.sample(model, None, **kw, seed=seed), rtol=0, atol=0)
    assert recorder.captures == 2 and recorder.replays == 4


@pytest.mark.parametrize("edit", ["img2img", "inpainting", "repaint"])
def test_an_editing_graph_reads_each_calls_init_mask_and_seeds(recorder, edit):
    """A cached capture of an editing call (init noised by the seeds: the start; the known region re-imposed from
    init and the mask) replays for a new seed and a new init with the eager result, owns its copies of init and the
    mask (the caller's may die; a later call's are copied into the graph's, never into the caller's tensors)."""
    model = TimeModel()
    g = torch.Generator().manual_seed(3)
    inits = [torch.randn(5, 6, generator=g) for _ in range(3)]
    masks = [torch.rand(5, 6, generator=g) > 0.5 for _ in range(3)]
    extra = {"img2img": dict(strength=0.6), "inpainting": {}, "repaint": dict(resample=2)}[edit]
    kw = _kw("euler", {}, **extra)
    kept = [t.clone() for t in inits + masks]
    for i, seed in enumerate((1, 2, 2)):
        init, mask = inits[i], (None if edit == "img2img" else masks[i])
        both = dict(init=init, **({} if mask is None else {"known_mask": mask}))
        got = fastdiff.sample(model, 20, **kw, **both, seed=seed, cuda_graph=True)
        torch.testing.assert_close(got, fastdiff.sample(model, 20, **kw, **both, seed=seed), rtol=0, atol=1e-6)
    assert recorder.captures == 1 and recorder.replays == 3
    assert all(torch.equal(t, k) for t, k in zip(inits + masks, kept))  # the caller's tensors untouched
    del inits[0], masks[0]  # the first call's init and mask die: the graph reads its own copies
    gc.collect()
    both = dict(init=inits[0], **({} if edit == "img2img" else {"known_mask": masks[0]}))
    got = fastdiff.sample(model, 20, **kw, **both, seed=4, cuda_graph=True)
    torch.testing.assert_close(got, fastdiff.sample(model, 20, **kw, **both, seed=4), rtol=0, atol=1e-6)


def test_img2img_and_inpainting_get_their_own_graphs(recorder):
    """Whether a call inpaints (a known_mask) and the mask's broadcast shape are part of the key."""
    model = TimeModel()
    init = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    kw = _kw("euler", {})
    for mask in (None, torch.ones(5, 6, dtype=torch.bool).tril(), torch.tensor([True, False] * 3)):
        extra = dict(strength=1.0) if mask is None else dict(known_mask=mask)
        got = fastdiff.sample(model, 20, **kw, init=init, seed=1, cuda_graph=True, **extra)
        torch.testing.assert_close(got, fastdiff.sample(model, 20, **kw, init=init, seed=1, **extra), rtol=0,
                                   atol=1e-6)
    assert recorder.captures == 3


@pytest.mark.parametrize("guided", [False, True])
def test_a_langevin_corrector_in_a_graph(recorder, guided):
    """The corrector's per-sample rows (its Gram pass, ε from the norms) are device ops filled from host weights
    without a tensor made from host data: captured, replayed for other seeds, the eager result."""
    model = TimeModel()
    kw = _kw("euler_ancestral", dict(corrector_steps=1, snr=0.1))
    if guided:
        kw.update(y=torch.tensor([0, 1, 2, 1, 0]), null_y=3)
    cfg = 2.0 if guided else 1.0
    for seed in (1, 2):
        got = fastdiff.sample(model, 20, cfg, **kw, seed=seed, cuda_graph=True)
        torch.testing.assert_close(got, fastdiff.sample(model, 20, cfg, **kw, seed=seed), rtol=0, atol=1e-6)
    assert recorder.captures == 1 and recorder.replays == 2


@pytest.mark.parametrize("targets", ["y", "classifier_y"])
def test_a_classifier_graph_reads_each_calls_targets(recorder, targets):
    """Classifier guidance in a cached capture: a later call's target classes (classifier_y, or y) are refilled
    (they were the first call's: a different gradient, silently); the caller's label tensors are left as given."""
    model = TimeModel(dim=4)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))

    def classifier(x, t):
        return torch.tanh(x) @ w

    kw = dict(shape=(4,), classifier=classifier, classifier_scale=2.0, seed=1)
    labels = [torch.tensor(v) for v in ([0, 1, 2, 1, 0], [2, 2, 0, 1, 1], [1, 0, 0, 2, 2])]
    kept = [t.clone() for t in labels]
    for y in labels:
        more = dict(y=y, null_y=3) if targets == "y" else dict(classifier_y=y, batch_size=5)
        cfg = 2.0 if targets == "y" else 1.0
        got = fastdiff.sample(model, 20, cfg, **kw, **more, cuda_graph=True)
        torch.testing.assert_close(got, fastdiff.sample(model, 20, cfg, **kw, **more), rtol=0, atol=1e-6)
    assert recorder.captures == 1 and recorder.replays == 3
    assert all(torch.equal(t, k) for t, k in zip(labels, kept))
