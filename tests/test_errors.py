"""One error story: each bad input a new user might try gets one line naming the problem (exit 2), before any work is
done or any output is written; a bug keeps its traceback. And the writes behind it are durable and readable."""

import json
import os
import stat
import threading

import pytest
import torch

import bytelm
from bytelm import BytelmError, ConfigError, GenerationError
from bytelm.cli import main

TINY = bytelm.MegabyteConfig.from_name("tiny", max_seq_len=64)


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    bytelm.Megabyte(TINY).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def one_line_error(capsys, argv, message) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith(f"bytelm {argv[0]}: error: ")
    return captured.out


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--top-k", "0"], "top_k must be an integer in 1..256"),
    (["--max-bytes", "-1"], "max_new_bytes must be >= 0"),
    (["--prompt", "abc", "--max-bytes", "62"], "prompt (3 bytes) + max_new_bytes (62) = 65 exceeds this model's "
                                               "max_seq_len of 64"),
])
def test_generation_settings_are_refused_before_anything_is_printed(model_dir, capsys, argv, message):
    assert one_line_error(capsys, ["generate", str(model_dir), *argv], message) == ""  # not even the prompt


def test_generate_out_writes_nothing_for_a_refused_request(model_dir, tmp_path, capsys):
    out = tmp_path / "gen.bin"
    one_line_error(capsys, ["generate", str(model_dir), "--prompt", "abc", "--max-bytes", "62", "--out", str(out)],
                   "exceeds this model's max_seq_len")
    assert not out.exists()  # no empty file, and no "wrote 62 bytes"


def test_generate_out_says_what_it_wrote(model_dir, tmp_path, capsys):
    out = tmp_path / "gen.bin"
    assert main(["generate", str(model_dir), "--prompt", "abc", "--max-bytes", "61", "--out", str(out)]) == 0
    assert out.stat().st_size == 61 and f"wrote 61 bytes to {out}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/no/such/folder/gen.bin"], "--out: the folder {tmp}/no/such/folder does not exist"),
    (["--out", "{tmp}"], "--out: {tmp} is a folder; name a file to write"),
    (["--prompt-file", "{tmp}"], "--prompt-file: {tmp} is a folder, not a file"),
    (["--prompt-file", "{tmp}/nothing.txt"], "--prompt-file: {tmp}/nothing.txt not found"),
    (["--prompt", "a", "--prompt-file", "{tmp}/model/config.json"], "give --prompt or --prompt-file, not both"),
])
def test_generate_paths_are_checked_first(model_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    one_line_error(capsys, ["generate", str(model_dir), *argv], message.replace("{tmp}", str(tmp_path)))


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "65"], "seq_len must be in 1..max_seq_len=64 of this model, got 65"),
    (["--mode", "sliding", "--stride", "0"], "stride must be in 1..seq_len=64, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--max-bytes", "0"], "max_bytes must be >= 1"),
    (["--mode", "chunked", "--stride", "8"], "chunked windows do not overlap"),
])
def test_eval_settings(model_dir, tmp_path, capsys, argv, message):
    data = tmp_path / "data.txt"
    data.write_bytes(b"hello bytes " * 20)
    one_line_error(capsys, ["eval", str(model_dir), "--data", str(data), *argv], message)


def test_eval_scores_a_named_file_whole(model_dir, tmp_path, capsys):
    data = tmp_path / "two.txt"
    data.write_bytes(b"hi")
    assert main(["eval", str(model_dir), "--data", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bytes"] == 2 and res["split"] == "all"  # not "over 1 bytes" of a validation tail
    expected = bytelm.evaluate(bytelm.load(model_dir), b"hi").bpb
    assert res["bpb"] == pytest.approx(expected)
    assert main(["eval", str(model_dir), "--data", str(data), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == 1  # --split still picks a part when asked


@pytest.mark.parametrize("override, message", [
    ("patch_size=four", "megabyte config field patch_size must be int, got 'four' (str)"),
    ("dropout=true", "megabyte config field dropout must be float, got True (bool)"),
    ("global_dim=64.5", "megabyte config field global_dim must be int, got 64.5 (float)"),
])
def test_model_overrides_are_type_checked(tmp_path, capsys, override, message):
    one_line_error(capsys, ["train", "--preset", "tiny", "--model", override, "--out-dir", str(tmp_path / "r")],
                   message)


def test_config_json_is_type_checked(model_dir, capsys):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "local_layers": "2"}))
    one_line_error(capsys, ["generate", str(model_dir)],
                   f"{model_dir / 'config.json'}: megabyte config field local_layers must be int, got '2' (str)")
    with pytest.raises(bytelm.CheckpointError, match="local_layers must be int"):
        bytelm.load(model_dir)


def test_train_config_file_is_type_checked(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"max_steps": "10"}))
    one_line_error(capsys, ["train", "--config", str(settings)], "train config field max_steps must be int, got '10'")
    settings.write_text("[1, 2]")
    one_line_error(capsys, ["train", "--config", str(settings)], "must hold a JSON object")


def test_typed_configs_in_python():
    with pytest.raises(ConfigError, match="patch_size must be int"):
        bytelm.MegabyteConfig.from_dict({"patch_size": "8"})
    assert bytelm.MegabyteConfig.from_dict({"dropout": 0}).dropout == 0.0  # JSON writes 0.0 as 0: accepted
    assert isinstance(ConfigError("x"), BytelmError) and isinstance(ConfigError("x"), ValueError)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import bytelm.cli.presets as presets

    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(presets, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["presets"])


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


# --- generation is checked before the first byte, and never mutates the model -------------------------------------
def test_stream_checks_when_called_not_when_first_iterated():
    model = bytelm.Megabyte(TINY)
    with pytest.raises(GenerationError, match="exceeds"):
        model.stream(b"abc", 62)  # no next() needed: a server would not have sent 200 OK
    with pytest.raises(GenerationError, match="temperature"):
        bytelm.generation.decode(model, torch.zeros(1, 3, dtype=torch.long), 4, temperature=float("nan"))


def test_inference_does_not_touch_the_training_flag():
    torch.manual_seed(0)
    model = bytelm.Megabyte(TINY.replace(dropout=0.5)).train()
    out = model.generate(b"abc", 20, temperature=0)
    assert model.training  # not flipped to eval and back
    assert out == model.eval().generate(b"abc", 20, temperature=0)  # and no dropout under inference mode
    x = torch.randint(0, 256, (2, 40))
    model.train()
    assert bytelm.evaluate(model, x[0]).bpb == bytelm.evaluate(model.eval(), x[0]).bpb


def test_two_threads_generating_at_once_get_what_each_gets_alone():
    torch.manual_seed(0)
    model = bytelm.Megabyte(TINY.replace(dropout=0.2)).train()  # train mode: a flag flip would show
    prompts = [b"def f", b"class A:\n", b"import o", b"x = 1\n"]
    alone = [model.generate(p, 40, temperature=0.9, top_k=20, seed=i) for i, p in enumerate(prompts)]
    barrier, results = threading.Barrier(len(prompts)), {}

    def work(i):
        barrier.wait()
        results[i] = model.generate(prompts[i], 40, temperature=0.9, top_k=20, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == alone


# --- files: readable by others as the umask allows, durable before `latest` moves -----------------------------------
def test_model_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        bytelm.Megabyte(TINY).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for f in ("config.json", "model.safetensors", "README.md"):
        assert stat.S_IMODE((tmp_path / "m" / f).stat().st_mode) == 0o644, f


def test_checkpoint_files_honour_the_umask(tmp_path):
    from bytelm.training import TrainConfig, train

    data = tmp_path / "data.txt"
    data.write_bytes(bytes(range(256)) * 40)
    old = os.umask(0o027)
    try:
        train(TrainConfig.flat(preset="tiny", data=[str(data)], out_dir=str(tmp_path / "run"), seq_len=64, batch_size=2,
                               max_steps=1, eval_batches=1, sample_bytes=0), log=lambda *_: None)
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "run").rglob("*") if f.is_file() and f.suffix != ".png"]
    assert {f.name for f in files} >= {"optimizer.safetensors", "trainer_state.json", "model.safetensors", "latest"}
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}


def test_checkpoint_is_fsynced_before_latest_moves(tmp_path, monkeypatch):
    from bytelm.training import TrainConfig, Trainer

    data = tmp_path / "data.txt"
    data.write_bytes(bytes(range(256)) * 40)
    cfg = TrainConfig.flat(preset="tiny", data=[str(data)], out_dir=str(tmp_path / "run"), seq_len=64, batch_size=2,
                           max_steps=2, eval_batches=1, sample_bytes=0, log_interval=100)
    trainer = Trainer(cfg, log=lambda *_: None)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    trainer.run()
    moved = max(i for i, (kind, path) in enumerate(events) if kind == "replace" and path.endswith("latest"))
    synced = {path for kind, path in events[:moved] if kind == "fsync"}
    ckpt = tmp_path / "run" / "checkpoints"
    for name in ("optimizer.safetensors", "trainer_state.json", "model.safetensors", "config.json"):
        assert any(p.endswith(f".step-0000002.tmp/{name}") for p in synced), name
    assert any(p.endswith(".step-0000002.tmp") for p in synced)  # the folder's entries
    assert str(ckpt) in synced  # the rename of step-0000002 into place
    assert str(ckpt) == events[moved + 1][1]  # and latest's own rename, right after it
