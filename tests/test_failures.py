"""Every failure is loud, bounded and loses nothing (issue 17): a generation that fails never reports success, a run
that diverges never saves its broken weights, checkpoints are pruned only when superseded, and each bad input or
corrupt file is one line with exit 2. Each case runs the real CLI (in-process, or as a process where the process
matters: argv bytes, a file-size limit) and checks the message, the exit code and what was kept."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bytelm
from bytelm.cli import main
from bytelm.generation.engine import Engine, SamplingParams
from bytelm.io import latest_checkpoint

TINY = bytelm.MegabyteConfig.from_name("tiny", max_seq_len=64)
TRAIN = ["--preset", "tiny", "--model", "max_seq_len=64", "--batch-size", "2", "--log-interval", "1",
         "--eval-batches", "1", "--sample-bytes", "0", "--precision", "fp32", "--warmup-steps", "1"]


def one_line_error(capsys, argv, message) -> tuple[str, str]:
    """Runs `bytelm ARGV` in-process: exit 2, one line on stderr naming the problem, no traceback."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert message in last, captured.err
    assert last.startswith(f"bytelm {argv[0]}: error: ") and "Traceback" not in captured.err, captured.err
    return captured.out, captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    (root / "b.txt").write_bytes(b"def f(x):\n    return x * 2\n" * 400)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model"
    bytelm.Megabyte(TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nan_model_dir(model_dir) -> Path:
    model = bytelm.load(model_dir)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    path = model_dir.parent / "nan-model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4 (kept: both)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TRAIN, "--data", str(data), "--out-dir", str(out), "--max-steps", "4",
                 "--save-interval", "2", "--eval-interval", "4"]) == 0
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# --- 1. a generation that fails reports failure ------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2**70)], "seed must be an integer in 0..2**64-1"),
    (["--seed", "-1"], "seed must be an integer in 0..2**64-1"),
    (["--temperature", "1e-45"], "temperature 1e-45 underflows float32"),
    (["--top-p", "1e-300"], "top_p 1e-300 underflows float32"),
])
def test_settings_that_cannot_sample_are_refused_before_the_first_byte(model_dir, capsys, argv, message):
    out, _ = one_line_error(capsys, ["generate", str(model_dir), "--prompt", "ab", *argv], message)
    assert out == ""


@pytest.mark.parametrize("argv", [["--temperature", "1e-30"], ["--top-p", "1e-30"], ["--temperature", "1e-6"]])
def test_tiny_but_representable_settings_sample_as_greedy(model_dir, capsys, argv):
    assert main(["generate", str(model_dir), "--prompt", "ab", "--max-bytes", "12", "--seed", "3", *argv]) == 0
    sampled = capsys.readouterr().out
    assert main(["generate", str(model_dir), "--prompt", "ab", "--max-bytes", "12", "--temperature", "0"]) == 0
    assert sampled == capsys.readouterr().out


def test_a_model_that_outputs_nan_fails_loudly_on_stdout(nan_model_dir, capsys):
    _, err = one_line_error(capsys, ["generate", str(nan_model_dir), "--prompt", "ab", "--max-bytes", "8"],
                            "generation failed after 0 bytes: the model's next-byte logits are not finite")
    assert "the output above is incomplete" in err


def test_a_failed_generation_never_leaves_its_partial_output_as_the_answer(model_dir, tmp_path, capsys, monkeypatch):
    # the engine fails at the 5th byte (as a swarm whose last server of a span died would): --out stays absent and
    # what was made is kept beside it
    from bytelm.models.megabyte import Megabyte
    real, calls = Megabyte.decode_step, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise bytelm.GenerationFailed("the swarm lost its last server for blocks 0:2")
        return real(self, *a, **k)

    monkeypatch.setattr(Megabyte, "decode_step", failing)
    out = tmp_path / "gen.bin"
    _, err = one_line_error(capsys, ["generate", str(model_dir), "--max-bytes", "20", "--out", str(out)],
                            "generation failed after 4 bytes: the swarm lost its last server for blocks 0:2; the 4 "
                            f"bytes made are in {out}.partial")
    assert not out.exists() and (tmp_path / "gen.bin.partial").stat().st_size == 4
    calls.clear()
    one_line_error(capsys, ["generate", str(model_dir), "--max-bytes", "20", "--prompt", "xy"],
                   "generation failed after 4 bytes")
    monkeypatch.undo()
    assert main(["generate", str(model_dir), "--max-bytes", "0", "--out", str(out)]) == 0  # complete, if empty
    assert out.read_bytes() == b"" and not (tmp_path / "gen.bin.partial").exists()


def test_eval_of_a_nan_model_is_an_error_not_a_score(nan_model_dir, data, capsys):
    one_line_error(capsys, ["eval", str(nan_model_dir), "--data", str(data)], "(not finite): its weights or outputs")


def test_model_generate_and_stream_raise_on_nan_logits(nan_model_dir):
    model = bytelm.load(nan_model_dir)
    for greedy in (0.0, 1.0):
        with pytest.raises(bytelm.GenerationFailed, match="not finite"):
            model.generate(b"ab", 4, temperature=greedy)
        with pytest.raises(bytelm.GenerationFailed, match="not finite"):
            list(model.stream(b"ab", 4, temperature=greedy))


def test_the_engine_ends_only_the_broken_row(model_dir):
    # one row's logits turn NaN mid-batch: that request ends with an error, the other is byte for byte as alone
    model = bytelm.load(model_dir)
    alone = Engine(model, max_streams=2).generate(b"hello", SamplingParams(max_new_bytes=10, temperature=0)).data
    engine = Engine(model, max_streams=2)
    outs: dict[str, list] = {"a": [], "b": []}
    a = engine.submit(b"hello", SamplingParams(max_new_bytes=10, temperature=0), outs["a"].append)
    engine.submit(b"zzz", SamplingParams(max_new_bytes=10, temperature=0), outs["b"].append)
    engine.step()  # both prefilled and one byte sampled
    b = next(r for r in engine.running.values() if r is not a)
    while b.logits is None:  # its first byte waits to line up with a's patch borders, then is fed
        engine.step()
    b.logits = torch.full_like(b.logits, float("nan"))
    while engine.running:
        engine.step()
    assert b"".join(o.data for o in outs["a"]) == alone and outs["a"][-1].finish_reason == "length"
    assert outs["b"][-1].finish_reason == "error" and "not finite" in outs["b"][-1].error


# --- 2. training that diverges is never saved as if it were fine -------------------------------------------------
@pytest.mark.parametrize("save_interval, message", [
    ("1", "training diverged at step 5: the updated weights are not finite or give a non-finite loss"),
    ("100", "training diverged at step 9: loss nan, gradient norm nan: 4 steps in a row were not finite"),
])
def test_a_diverging_run_stops_without_moving_latest(trained, tmp_path, capsys, save_interval, message):
    # lr 1e30: the first resumed update leaves finite weights whose every forward overflows; with a checkpoint due
    # then, the check before saving stops the run; without, 3 skipped steps and the 4th stop it
    out = copy_run(trained, tmp_path)
    before = {p.name: load_file(p / "model.safetensors") for p in (out / "checkpoints").glob("step-*")}
    out_, err = one_line_error(capsys, ["train", "--out-dir", str(out), "--resume", "--max-steps", "12",
                                        "--save-interval", save_interval, "--lr", "1e30"], message)
    assert "checkpoints/latest still names step-0000004" in err
    assert out_.count("update skipped") == (0 if save_interval == "1" else 3)
    assert latest_checkpoint(out).name == "step-0000004"
    for p in (out / "checkpoints").glob("step-*"):
        weights = load_file(p / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), p.name
        if p.name in before:
            assert all(torch.equal(weights[k], before[p.name][k]) for k in weights)
    assert bytelm.load(out).loss(torch.randint(0, 256, (1, 32))).isfinite()


def test_a_bad_step_is_skipped_and_training_goes_on(trained, tmp_path):
    # one non-finite step (a bad batch) is skipped, makes no update, and the run ends well
    from bytelm.training import TrainConfig, Trainer

    saved = TrainConfig.from_dict(json.loads((trained / "run.json").read_text())["train"])
    cfg = TrainConfig.flat(**{**saved.flat_settings(), "out_dir": str(tmp_path / "r"), "max_steps": 4,
                              "save_interval": 4})
    t = Trainer(cfg, log=lambda *_: None)
    real, n = t.forward, []

    def poisoned(x, **kw):  # the loss of the second step's batch is NaN
        n.append(1)
        loss = real(x, **kw)
        return loss * float("nan") if len(n) == 2 else loss

    t.forward = poisoned
    seen = []
    orig_step = t.optimizer.step
    t.optimizer.step = lambda: (seen.append(t.step), orig_step())[1]
    result = t.run()
    assert result["step"] == 4 and seen == [0, 2, 3]  # no update at the second step
    assert latest_checkpoint(tmp_path / "r").name == "step-0000004"


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "lr=inf: every number must be finite"),
    (["--grad-clip", "nan"], "grad_clip=nan: every number must be finite"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--beta1", "2"], "beta1 and beta2 must be in [0, 1)"),
    (["--model", "rope_base=-1"], "rope_base must be > 1"),
    (["--max-bad-steps", "-1"], "max_bad_steps must be >= 0"),
])
def test_train_settings_that_cannot_train_are_refused(tmp_path, capsys, argv, message):
    one_line_error(capsys, ["train", "--out-dir", str(tmp_path / "r"), *argv], message)
    assert not (tmp_path / "r").exists()


def test_lora_alpha_nan_is_refused(model_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    one_line_error(capsys, ["finetune", str(model_dir), "--out-dir", str(tmp_path / "f"), "--lora-alpha", "nan"],
                   "lora_alpha must be > 0, got nan")


def test_optimizer_state_of_other_shapes_is_refused_on_resume(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    opt = out / "checkpoints" / "step-0000004" / "optimizer.safetensors"
    tensors = load_file(opt)
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, opt)
    one_line_error(capsys, ["train", "--out-dir", str(out), "--resume", "--max-steps", "6"],
                   "moments of other shapes than the model's")


# --- 3. checkpoints: pruning, latest, a full disk ----------------------------------------------------------------
def test_stray_checkpoints_without_latest_are_not_pruned_nor_mixed_in(trained, tmp_path, capsys, data):
    out = copy_run(trained, tmp_path)
    (out / "checkpoints" / "latest").unlink()
    for old, new in (("step-0000002", "step-0000020"), ("step-0000004", "step-0000030")):
        os.rename(out / "checkpoints" / old, out / "checkpoints" / new)
    one_line_error(capsys, ["train", *TRAIN, "--data", str(data), "--out-dir", str(out), "--max-steps", "3",
                            "--save-interval", "1"], "holds step-0000020, step-0000030 but no `latest`")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]


def test_rolling_latest_back_sets_the_later_checkpoints_aside(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    ckpts = out / "checkpoints"
    for step in (20, 30):  # two later checkpoints, as if the run had gone on
        shutil.copytree(ckpts / "step-0000004", ckpts / f"step-{step:07d}")
    (ckpts / "latest").write_text("step-0000002\n")
    assert main(["train", "--out-dir", str(out), "--resume", "--max-steps", "5", "--save-interval", "1"]) == 0
    assert "moved to" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step-0000005"
    kept = sorted(p.name for p in ckpts.glob("step-*"))
    assert kept == ["step-0000004", "step-0000005"]  # pruned: only this lineage's superseded ones
    aside = next(ckpts.glob("rolled-back-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000004", "step-0000020", "step-0000030"]
    assert bytelm.load(out).loss(torch.randint(0, 256, (1, 32))).isfinite()


@pytest.mark.parametrize("pointer", ["/etc", "../../outside", "step-0000004/../../x", "step-4", "\xff\xfe"])
def test_latest_is_confined_to_the_run_folder(trained, tmp_path, capsys, pointer):
    out = copy_run(trained, tmp_path)
    (out / "checkpoints" / "latest").write_bytes(pointer.encode("latin-1"))
    one_line_error(capsys, ["generate", str(out), "--max-bytes", "2"], "checkpoints/latest")
    one_line_error(capsys, ["train", "--out-dir", str(out), "--resume", "--max-steps", "6"], "checkpoints/latest")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(trained, tmp_path):
    # a real process under a file-size limit smaller than a checkpoint's weights: writing the next checkpoint fails
    out = copy_run(trained, tmp_path)
    limit = (out / "checkpoints" / "step-0000004" / "model.safetensors").stat().st_size // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run([sys.executable, "-m", "bytelm.cli", "train", "--out-dir", str(out), "--resume",
                          "--max-steps", "6", "--save-interval", "2"], preexec_fn=limited, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint step-0000006: File too large" in last and "Traceback" not in res.stderr
    assert "checkpoints/latest still names step-0000004" in last
    assert latest_checkpoint(out).name == "step-0000004"
    assert not list((out / "checkpoints").glob(".*tmp")) and not (out / "checkpoints" / "step-0000006").exists()
    assert bytelm.load(out).loss(torch.randint(0, 256, (1, 32))).isfinite()


# --- 6. tracebacks and silent acceptances ------------------------------------------------------------------------
def run_cli(*argv: bytes | str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytelm.cli", *argv], capture_output=True, timeout=timeout)


@pytest.mark.parametrize("flag, hint", [("--prompt", "--prompt-file"), ("--stop", "")])
def test_non_utf8_arguments_are_one_line(model_dir, flag, hint):
    res = run_cli("generate", str(model_dir), flag, b"ab\xff\xfe")
    err = res.stderr.decode()
    assert res.returncode == 2 and err.count("\n") == 1 and f"{flag} is not valid UTF-8 (at character 2)" in err
    assert hint in err and res.stdout == b""


def test_out_on_a_full_device_is_one_line(model_dir, capsys):
    one_line_error(capsys, ["generate", str(model_dir), "--max-bytes", "4", "--out", "/dev/full"],
                   "--out: cannot write /dev/full: No space left on device")


def test_prompt_file_reads_are_bounded(model_dir, capsys):
    one_line_error(capsys, ["generate", str(model_dir), "--prompt-file", "/dev/zero"],
                   "--prompt-file: /dev/zero holds more than 67,108,864 bytes")


def test_out_dir_that_is_a_file(tmp_path, capsys, data):
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, ["train", *TRAIN, "--data", str(data), "--out-dir", str(tmp_path / "f")],
                   "is a file, not a folder")


@pytest.mark.parametrize("argv, message", [
    (["train", "--max-step", "3"], "Unrecognized options: --max-step, 3; did you mean --max-steps"),
    (["train", "--max-steps", "x"], "--max-steps: invalid literal for int()"),
    (["generate", "m", "--top-k"], "Missing value for argument '--top-k'"),
    (["serve", "m", "--log-level", "foo"], "invalid choice 'foo' for argument '--log-level'"),
])
def test_parse_errors_are_one_line(capsys, argv, message):
    one_line_error(capsys, argv, message)


def corrupt(out: Path, what: str) -> None:
    ckpt = out / "checkpoints" / "step-0000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if what == "run.json":
        (out / "run.json").write_text("{not json")
    elif what == "metrics.csv":
        (out / "metrics.csv").write_bytes(b"step,split\nxx,\xff\n")
    elif what == "trainer_state.json":
        (ckpt / "trainer_state.json").write_text("[1, 2")
    elif what == "step -100":
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "step": -100}))
    elif what == "elapsed":
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "elapsed": "soon"}))
    elif what == "sampler":
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "sampler": {"rng": 7, "step": 1}}))
    elif what == "rng":
        tensors = load_file(ckpt / "optimizer.safetensors")
        tensors["rng.torch"] = tensors["rng.torch"][:100].clone()
        save_file(tensors, ckpt / "optimizer.safetensors")


@pytest.mark.parametrize("what, message", [
    ("run.json", "run.json is not valid JSON"),
    ("metrics.csv", "metrics.csv is not a bytelm metrics log"),
    ("trainer_state.json", "trainer_state.json is not valid JSON"),
    ("step -100", "step is -100, not the step its folder is named after"),
    ("elapsed", "elapsed is 'soon'"),
    ("sampler", "random number generator state is corrupt"),
    ("rng", "random number generator state is corrupt"),
])
def test_corrupt_run_files_are_one_line_on_resume(trained, tmp_path, capsys, what, message):
    out = copy_run(trained, tmp_path)
    corrupt(out, what)
    one_line_error(capsys, ["train", "--out-dir", str(out), "--resume", "--max-steps", "6"], message)
    assert latest_checkpoint(out).name == "step-0000004"  # nothing moved, nothing written


def test_serve_on_a_port_in_use_is_one_line(model_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pytest.importorskip("uvicorn")
        one_line_error(capsys, ["serve", str(model_dir), "--port", str(port)], f"127.0.0.1:{port} is in use")


def test_merge_refuses_to_overwrite_a_folder(model_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    from bytelm.finetune import apply_lora, save_adapter

    adapter, base = tmp_path / "adapter", bytelm.load(model_dir)
    peft_model = apply_lora(base, "all", 2, 4.0)
    with torch.no_grad():  # a fresh LoRA's B is zero: make the merge change the weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_adapter(peft_model, adapter, base.config, str(model_dir), None)
    target = tmp_path / "target"
    shutil.copytree(model_dir, target)
    before = (target / "model.safetensors").read_bytes()
    one_line_error(capsys, ["merge", str(adapter), "--out", str(target)], "is not empty")
    assert (target / "model.safetensors").read_bytes() == before
    assert main(["merge", str(adapter), "--out", str(target), "--force"]) == 0
    assert (target / "model.safetensors").read_bytes() != before


def test_an_eval_batch_that_cannot_fit_is_refused_before_it_runs(model_dir, data, capsys, monkeypatch):
    # the logits of a batch of 64 windows x 64 bytes (8.4 MB, a floor of what it holds) against the memory available,
    # here set to 5 MB (the model itself needs 1.2 MB to load)
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "5MB")
    out, _ = one_line_error(capsys, ["eval", str(model_dir), "--data", str(data), "--batch-size", "64"],
                            "this evaluation needs about")
    assert "bits per byte" not in out
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "1GB")
    assert main(["eval", str(model_dir), "--data", str(data), "--batch-size", "64"]) == 0


def test_a_config_json_of_absurd_depth_is_refused_at_once(model_dir, tmp_path, capsys):
    # found by the property test: 100,000 layers took 80 s to build as a skeleton before the weights were compared
    import time

    folder = tmp_path / "deep"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "global_layers": 105_033}))
    t0 = time.perf_counter()
    one_line_error(capsys, ["generate", str(folder), "--max-bytes", "2"], "global_layers must be in 1..1024")
    assert time.perf_counter() - t0 < 10
