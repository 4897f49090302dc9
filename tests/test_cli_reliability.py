"""Reliability round 2, the command line: the regressions of its argument checks. Each hostile value
(a bool option spelt "no", an --option that has its own flag, a device this machine lacks, absurd step,
size, seed and scale values) is a one-line error naming the flag, with exit status 2, before any work."""

import pytest
import torch

from fastdiff import cli

RING = ["train", "--data", "ring", "--batch-size", "8", "--no-progress"]
BENCH = ["bench", "--ops", "randn", "--sizes", "10", "--dtypes", "fp32", "--repeat", "1", "--no-csv", "--no-compile"]


def _refused(capsys, argv, flag, *words):
    """argv stops at the argument parse (so nothing can start): exit 2, one line naming ``flag`` and ``words``."""
    with pytest.raises(SystemExit) as e:
        cli._parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fastdiff {argv[0]}: error: argument {flag}:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in line, (w, line)
    return line


# ---- --option NAME=VALUE ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("False", False), ("false", False), ("no", False), ("0", False),
                                        ("NO", False), ("True", True), ("yes", True), ("1", True)])
def test_bool_option_values_are_read_strictly(text, value):
    args = cli._parser().parse_args(["sample", "--checkpoint", "x", "--option", f"lower_order_final={text}"])
    assert args.option == [("lower_order_final", value)]
    assert type(args.option[0][1]) is bool


@pytest.mark.parametrize("text", ["maybe", "2", "", "nope", "1.0"])
def test_bool_option_refuses_other_words(capsys, text):
    _refused(capsys, ["sample", "--checkpoint", "x", "--option", f"denoise={text}"], "--option", "denoise")


def test_option_values_follow_the_options_type(capsys):
    args = cli._parser().parse_args(["sample", "--checkpoint", "x", "--option", "order=3", "--option", "r=1",
                                     "--option", "solver_type=heun"])
    assert args.option == [("order", 3), ("r", 1.0), ("solver_type", "heun")]
    assert type(args.option[1][1]) is float
    _refused(capsys, ["sample", "--checkpoint", "x", "--option", "order=2.5"], "--option", "order", "integer")
    _refused(capsys, ["sample", "--checkpoint", "x", "--option", "eta=much"], "--option", "eta", "number")


@pytest.mark.parametrize("name,flag", [("cfg", "--cfg"), ("seed", "--seed"), ("steps", "--steps"),
                                       ("method", "--method"), ("device", "--device"), ("sigma", "--sigma"),
                                       ("snr", "--snr"), ("guidance_rescale", "--guidance-rescale")])
@pytest.mark.parametrize("command", ["sample", "generate"])
def test_option_with_its_own_flag_is_refused(capsys, command, name, flag):
    _refused(capsys, [command, "--checkpoint", "x", "--option", f"{name}=1"], "--option", name, flag)


@pytest.mark.parametrize("name", ["y", "null_y", "path", "shape", "backend", "not_an_option"])
def test_option_that_is_no_method_option_is_refused(capsys, name):
    _refused(capsys, ["sample", "--checkpoint", "x", "--option", f"{name}=1"], "--option", name)


# ---- --device ------------------------------------------------------------------------------------------

COMMANDS = {"sample": ["sample", "--checkpoint", "x"], "generate": ["generate", "--checkpoint", "x", "--out", "g",
                                                                   "--num", "2"],
            "train": [*RING, "--out", "r", "--steps", "1"], "bench": BENCH, "evaluate": ["evaluate", "d", "--ref", "e"]}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device,words", [("tpu", ["'tpu'"]), ("meta", ["meta", "cpu or cuda"]),
                                          ("cuda:x", ["'cuda:x'"])])
def test_unknown_device_is_refused(capsys, command, device, words):
    _refused(capsys, [*COMMANDS[command], "--device", device], "--device", *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_cuda_is_refused(capsys, command, device):
    _refused(capsys, [*COMMANDS[command], "--device", device], "--device", "CUDA is not available")


# ---- absurd counts, sizes, seeds and scales -----------------------------------------------------------

HOSTILE = [
    # train / demo: the step count (2^32), the Trainer's seed range (2^23), float32's range for --lr
    ([*RING, "--out", "r", "--steps", str(10**12)], "--steps", "2^32"),
    ([*RING, "--out", "r", "--steps", str(2**32 + 1)], "--steps", "2^32"),
    ([*RING, "--out", "r", "--warmup", str(10**15)], "--warmup", "2^32"),
    ([*RING, "--out", "r", "--seed", str(2**23)], "--seed", "2^23"),
    ([*RING, "--out", "r", "--seed", str(10**30)], "--seed", "2^23"),
    ([*RING, "--out", "r", "--lr", "1e300"], "--lr", ""),
    (["demo", "--steps", str(10**12)], "--steps", "2^32"),
    (["demo", "--seed", str(2**23)], "--seed", "2^23"),
    # sample / generate: the sampler's step limit, seeds < 2^63, bounded guidance and noise scales
    (["sample", "--checkpoint", "x", "--steps", str(10**12)], "--steps", "100000"),
    (["sample", "--checkpoint", "x", "--steps", "100001"], "--steps", "100000"),
    (["sample", "--checkpoint", "x", "--seed", str(2**64)], "--seed", "2^63"),
    (["sample", "--checkpoint", "x", "--seed", "-1"], "--seed", ">= 0"),
    (["sample", "--checkpoint", "x", "--cfg", "inf"], "--cfg", "finite"),
    (["sample", "--checkpoint", "x", "--cfg", "1e300"], "--cfg", "10000"),
    (["sample", "--checkpoint", "x", "--cfg=-1e300"], "--cfg", "-10000"),
    (["sample", "--checkpoint", "x", "--sigma", "1e300"], "--sigma", "10000"),
    (["sample", "--checkpoint", "x", "--snr", "1e300"], "--snr", "10000"),
    (["sample", "--checkpoint", "x", "--per-class", str(10**12)], "--per-class", "2^16"),
    (["sample", "--checkpoint", "x", "--size", str(10**12)], "--size", "4096"),
    (["sample", "--checkpoint", "x", "--corrector-steps", "513"], "--corrector-steps", "512"),
    (["generate", "--checkpoint", "x", "--out", "g", "--num", str(10**12)], "--num-samples/--num", "2^30"),
    (["generate", "--checkpoint", "x", "--out", "g", "--num", "0"], "--num-samples/--num", ">= 1"),
    (["generate", "--checkpoint", "x", "--out", "g", "--num", "2", "--seed", str(2**63)], "--seed", "2^63"),
    (["generate", "--checkpoint", "x", "--out", "g", "--num", "2", "--steps", "nan"], "--steps", ""),
    (["generate", "--checkpoint", "x", "--out", "g", "--num", "2", "--cfg", "nan"], "--cfg", "finite"),
    # bench: log2 sizes in [4, 30], known dtypes and ops, bounded repeats and threads
    (["bench", "--sizes", "40"], "--sizes", "30"),
    (["bench", "--sizes", "20,3"], "--sizes", "4"),
    (["bench", "--sizes", "-1"], "--sizes", ""),
    (["bench", "--sizes", "1.5"], "--sizes", "'1.5'"),
    (["bench", "--sizes", ""], "--sizes", ""),
    (["bench", "--sizes", "20,,22"], "--sizes", ""),
    (["bench", "--dtypes", "fp8"], "--dtypes", "fp32, bf16, fp16"),
    (["bench", "--dtypes", "fp32,"], "--dtypes", ""),
    (["bench", "--ops", "step_ode,foo"], "--ops", "'foo' (choose from step_sde"),
    (["bench", "--repeat", str(10**12)], "--repeat", "1000"),
    (["bench", "--threads", str(10**12)], "--threads", "1024"),
    (["bench", "--latency-steps", "10,101"], "--latency-steps", "100"),
    (["bench", "--latency-shape", "16,0"], "--latency-shape", ">= 1"),
    (["bench", "--latency-batches", str(10**6)], "--latency-batches", "4096"),
]


@pytest.mark.parametrize("argv,flag,word", HOSTILE, ids=[" ".join(a[0][-2:]) for a in HOSTILE])
def test_hostile_numbers_are_refused_naming_the_flag(capsys, argv, flag, word):
    _refused(capsys, argv, flag, word)


def test_generate_seed_plus_num_stays_below_2_63(capsys, tmp_path):
    argv = ["generate", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "g"), "--num", "8",
            "--seed", str(2**63 - 4)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff generate: error: --seed") and "--num-samples" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_bench_sizes_beyond_the_memory_are_refused(capsys, monkeypatch):
    from fastdiff import cli_bench

    monkeypatch.setattr(cli_bench, "available_memory", lambda device: 1 << 30)  # 1 GiB
    assert cli.main([*BENCH, "--sizes", "10,28"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff bench: error: --sizes 28") and "GiB" in err and "Traceback" not in err


def test_bench_latency_settings_that_cannot_run_are_refused(capsys):
    """One step count gives no slope; a batch of millions is no latency case: refused before any work."""
    assert cli.main(["bench", "--ops", "latency", "--latency-steps", "5,5", "--no-csv"]) == 2
    assert cli.main(["bench", "--ops", "latency", "--latency-shape", "4096,65", "--no-csv"]) == 2
    captured = capsys.readouterr()
    first, second = captured.err.strip().splitlines()
    assert first.startswith("fastdiff bench: error: --latency-steps 5,5: give two or more distinct step counts")
    assert second.startswith("fastdiff bench: error: --latency-shape / --latency-batches: 17039360 elements")
    assert captured.out == "" and "Traceback" not in captured.err


def test_bench_runs_with_checked_arguments(capsys):
    assert cli.main(BENCH) == 0
    assert "randn" in capsys.readouterr().out


def test_out_of_host_memory_is_a_one_line_runtime_error(monkeypatch, capsys):
    def alloc(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 32000000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(cli, "_info", alloc)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastdiff info: error: out of memory") and "32000000000000 bytes" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_overwrite_starts_a_new_run_in_the_folder(tmp_path, capsys):
    """`fastdiff train --out R` resumes R; with --overwrite it starts afresh there (the earlier checkpoints go)."""
    from fastdiff.training import checkpoint as ckpt

    base = ["train", "--data", "ring", "--batch-size", "64", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(base + ["--steps", "4", "--checkpoint-every", "2"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [4, 2]
    assert cli.main(base + ["--steps", "4"]) == 0  # resumed at step 4: nothing to do
    with pytest.warns(RuntimeWarning, match="removed the 2 checkpoints"):
        assert cli.main(base + ["--steps", "1", "--overwrite", "--seed", "5"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [1]


def test_bench_checks_its_csv_folder_before_running(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["bench", "--ops", "randn", "--sizes", "10", "--repeat", "1", "--no-compile",
                     "--csv-dir", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert "--csv-dir" in captured.err and "not writable" in captured.err
    assert captured.out == ""  # refused before any case ran
