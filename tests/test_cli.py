"""The `bytelm` command end to end: train -> eval -> generate, and a clear one-line error for each bad input."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

import bytelm
from bytelm.cli import main
from bytelm.errors import ConfigError
from bytelm.finetune import FinetuneConfig
from bytelm.training.config import ModelSection, TrainConfig, parse_duration

TINY = ["--preset", "tiny", "--seq-len", "128", "--batch-size", "8", "--warmup-steps", "10", "--log-interval", "50",
        "--eval-batches", "2", "--sample-bytes", "32", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MEGABYTE trained for 150 steps on one real source file (~60 KB of Python)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py", data / "argparse.py")
    out = root / "run"
    assert main(["train", *TINY, "--data", str(data), "--max-steps", "150", "--lr", "3e-3", "--eval-interval", "150",
                 "--save-interval", "150", "--out-dir", str(out)]) == 0
    return data, out


def test_train_writes_a_self_describing_run(trained):
    data, out = trained
    assert (out / "loss.png").exists() and (out / "checkpoints" / "latest").exists()
    run = json.loads((out / "run.json").read_text())
    assert "split by tail" in run["data"] and run["train"]["schedule"]["max_steps"] == 150
    assert bytelm.load(out).config.to_dict() == run["model"]


def test_eval_on_its_own_training_data_beats_8_bits_by_far(trained, capsys):
    data, out = trained
    assert main(["eval", str(out), "--split", "train", "--json", "--seq-len", "128"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bpb"] < 4.0, res  # a uniform guess is 8 bits per byte
    assert res["bytes"] > 40_000


def test_eval_modes_score_the_same_bytes(trained, capsys):
    data, out = trained
    results = {}
    for mode in ("chunked", "sliding", "strided"):
        assert main(["eval", str(out), "--mode", mode, "--json", "--seq-len", "128", "--max-bytes", "2000"]) == 0
        results[mode] = json.loads(capsys.readouterr().out)
    assert {r["bytes"] for r in results.values()} == {2000}
    assert results["sliding"]["bpb"] <= results["chunked"]["bpb"] + 0.05  # more context per byte never hurts much


def test_generate_streams_and_writes_raw_bytes(trained, capsys, tmp_path):
    data, out = trained
    assert main(["generate", str(out), "--prompt", "def é", "--max-bytes", "40", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def é")  # the prompt is echoed, its 2-byte character intact
    assert main(["generate", str(out), "--prompt", "def é", "--max-bytes", "40", "--seed", "3",
                 "--out", str(tmp_path / "g.bin")]) == 0
    raw = (tmp_path / "g.bin").read_bytes()
    model = bytelm.load(out)
    assert raw == model.generate("def é".encode(), 40, temperature=0.8, seed=3)
    assert text == "def é" + ("def é".encode() + raw)[len("def é".encode()) :].decode("utf-8", "replace") + "\n"
    greedy = model.generate(b"def ", 40, temperature=0)  # --stop ends the output before the stop string's first
    stop = next(greedy[i : i + 2] for i in range(5, 38) if greedy[i : i + 2].isalnum())  # occurrence
    assert main(["generate", str(out), "--prompt", "def ", "--max-bytes", "40", "--temperature", "0",
                 "--out", str(tmp_path / "s.bin"), "--stop", stop.decode()]) == 0
    assert (tmp_path / "s.bin").read_bytes() == greedy[: greedy.find(stop)]


def test_resume_continues_a_run(trained, capsys):
    data, out = trained
    assert main(["train", "--resume", "--out-dir", str(out), "--max-steps", "160", "--sample-bytes", "0"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000160"


def test_a_run_from_before_muon_resumes_with_adamw(trained, tmp_path, capsys):
    """A run.json written before bytelm 0.4 has no `optimizer`: that run trained with AdamW alone, and --resume must
    go on with AdamW (with 0.4's default, Muon, its checkpoint's optimizer state would not fit)."""
    data, _ = trained
    out = tmp_path / "old"
    assert main(["train", *TINY, "--data", str(data), "--max-steps", "4", "--save-interval", "2", "--eval-interval",
                 "4", "--sample-bytes", "0", "--optimizer", "adamw", "--out-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    run["train"] = flat_before_sections(run["train"])
    del run["train"]["optimizer"]
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(out), "--max-steps", "6", "--sample-bytes", "0"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["train"]["optimizer"]["name"] == "adamw"


def flat_before_sections(settings: dict) -> dict:
    """A run's settings as run.json held them before the sections: one flat dict (without the later fields)."""
    flat = TrainConfig.from_dict(settings).flat_settings()
    return {k: v for k, v in flat.items() if k not in ("parallel", "fsdp_local", "consolidate")}


def test_a_flat_run_json_resumes(trained, tmp_path, capsys):
    """Every run.json written before the sections holds its settings flat: --resume reads them, and the run goes on
    with them (here: AdamW, a batch of 2) and records them sectioned; --model overrides merge into the saved ones."""
    data, _ = trained
    out = tmp_path / "flat"
    assert main(["train", *TINY, "--data", str(data), "--max-steps", "4", "--save-interval", "2", "--eval-interval",
                 "4", "--sample-bytes", "0", "--optimizer", "adamw", "--batch-size", "2", "--model",
                 "max_seq_len=256", "--out-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    run["train"] = flat_before_sections(run["train"])
    assert run["train"]["optimizer"] == "adamw" and run["train"]["batch_size"] == 2
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--max-bytes", "2000", "--no-codecs"]) == 0  # its split, from flat data
    scored = json.loads(capsys.readouterr().out)
    assert scored["split"] == "val" and str(data) in scored["data"]
    assert main(["train", "--resume", "--out-dir", str(out), "--max-steps", "6", "--sample-bytes", "0",
                 "--model", "dropout=0.0"]) == 0
    saved = json.loads((out / "run.json").read_text())["train"]
    assert saved["optimizer"]["name"] == "adamw" and saved["data"]["batch_size"] == 2
    assert saved["schedule"]["max_steps"] == 6
    assert saved["model"]["overrides"] == {"max_seq_len": 256, "dropout": 0.0}


def test_config_files_flat_and_sectioned(tmp_path):
    """--config FILE: a flat dict (as written before the sections), a run.json's "train", or the sectioned form; each
    to the same config, which round-trips through its dict; an unknown field or a wrong type is one clear error."""
    flat = {"preset": "tiny", "lr": 1e-3, "data": ["a.txt"], "optimizer": "adamw", "max_steps": 7, "model": {
        "patch_size": 4}, "lora_rank": 3}
    with pytest.raises(ConfigError, match=r"^unknown train config field\(s\): 'lora_rank'; known: out_dir, "):
        TrainConfig.from_dict(flat)
    del flat["lora_rank"]
    cfg = TrainConfig.from_dict(flat)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.data.paths, cfg.schedule.max_steps) == ("adamw", 1e-3,
                                                                                                 ["a.txt"], 7)
    assert cfg.model == ModelSection(type="megabyte", preset="tiny", overrides={"patch_size": 4})
    assert cfg.optimizer.weight_decay == 0.1  # a section given in part keeps the defaults for the rest
    sectioned = cfg.to_dict()
    assert sectioned["optimizer"]["lr"] == 1e-3 and "lr" not in sectioned
    assert TrainConfig.from_dict(json.loads(json.dumps(sectioned))) == cfg == TrainConfig.flat(**flat)
    assert TrainConfig.from_dict({"model": {"preset": "tiny"}, "schedule": {"max_steps": 7}}).schedule.max_steps == 7
    # `bytelm eval` reads a run's data settings alone, from a training run's or a fine-tune's, flat or sectioned
    assert TrainConfig.section_of({"base": "b", "lora_rank": 2, "val_fraction": 0.2}, "data").val_fraction == 0.2
    assert TrainConfig.section_of(sectioned, "data") == cfg.data == TrainConfig.section_of(flat, "data")
    with pytest.raises(ConfigError, match=r"^unknown train config field\(s\): 'optimizer.rate'; known: "
                                          r"optimizer.name, optimizer.lr"):
        TrainConfig.from_dict({"optimizer": {"rate": 1.0}})
    with pytest.raises(ConfigError, match=r"^train config field max_steps must be int, got '7' \(str\)$"):
        TrainConfig.from_dict({"max_steps": "7"})
    with pytest.raises(ConfigError, match=r"^train config field schedule.max_steps must be int, got '7' \(str\)$"):
        TrainConfig.from_dict({"schedule": {"max_steps": "7"}})
    with pytest.raises(ConfigError, match="optimizer.lr and lr are the same setting"):
        TrainConfig.from_dict({"lr": 1.0, "optimizer": {"lr": 2.0}})
    with pytest.raises(ConfigError, match="parallel must be one of ddp, fsdp, got 'zero'"):
        TrainConfig.flat(parallel="zero")
    with pytest.raises(ConfigError, match="fsdp_local must be one of shard, root, got 'leaf'"):
        TrainConfig.from_dict({"parallel": {"fsdp_local": "leaf"}})
    # a fine-tune's flat settings held TrainConfig's model fields, empty; its own defaults fill what is not given
    tune = FinetuneConfig.from_dict({"base": "b", "model_type": "", "preset": "", "model": {}, "lora_rank": 4,
                                     "lr": 2e-3})
    assert (tune.lora.rank, tune.optimizer.name, tune.optimizer.lr, tune.schedule.max_steps) == (4, "adamw", 2e-3, 300)
    assert FinetuneConfig.from_dict(tune.to_dict()) == tune
    with pytest.raises(ConfigError, match="model_type, preset and model do not apply"):
        FinetuneConfig.from_dict({"base": "b", "preset": "tiny"})


def test_cli_config_file_flat_and_sectioned(tmp_path):
    """`--config FILE` over flat and sectioned files alike, flags over either; the parse builds the config."""
    from bytelm.cli.runconfig import parse_run_config

    flat, sectioned = tmp_path / "flat.json", tmp_path / "sectioned.json"
    flat.write_text(json.dumps({"preset": "tiny", "lr": 1e-3, "batch_size": 3, "model": {"patch_size": 4}}))
    sectioned.write_text(json.dumps({"train": TrainConfig.from_dict(json.loads(flat.read_text())).to_dict()}))
    for path in (flat, sectioned):
        cfg, resume = parse_run_config(TrainConfig, ["--config", str(path), "--lr", "2e-3", "--model", "dropout=0.1"],
                                       "bytelm train", "", "")
        assert (cfg.optimizer.lr, cfg.data.batch_size, cfg.model.preset, resume) == (2e-3, 3, "tiny", False)
        assert cfg.model.overrides == {"patch_size": 4, "dropout": 0.1}
        assert cfg.out_dir == "runs/megabyte-tiny"  # named after the model the flags and file make


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/no/such/path"], "does not exist"),
        (["train", "--data", "{empty}"], "empty"),
        (["train", "--data", "{short}", "--seq-len", "128"], "fewer than one window"),
        (["train", "--model", "patch_size=3"], "multiple of patch_size"),
        (["train", "--model", "depth=3"], "unknown megabyte config field"),
        (["train", "--preset", "giant"], "unknown megabyte preset 'giant'"),
        (["train", "--seq-len", "4096"], "exceeds the model's max_seq_len"),
        (["train", "--resume", "--out-dir", "{tmp}/nothing"], "not found"),
        (["train", "--config", "{tmp}/nope.json"], "not found"),
        (["generate", "{tmp}/nothing"], "does not exist"),
        (["generate", "{model}", "--max-bytes", "999999"], "exceeds this model's max_seq_len"),
        (["generate", "{model}", "--temperature", "-1"], "temperature"),
        (["eval", "{tmp}"], "has no config.json"),
    ],
)
def test_bad_input_gets_one_clear_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    model_dir = tmp_path / "model"
    bytelm.Megabyte(bytelm.MegabyteConfig.from_name("tiny")).save_pretrained(model_dir)
    subs = {"{empty}": str(tmp_path / "empty.txt"), "{short}": str(tmp_path / "short.txt"), "{tmp}": str(tmp_path),
            "{model}": str(model_dir)}
    for k, v in subs.items():
        argv = [a.replace(k, v) for a in argv]
    argv = [*argv, "--out-dir", str(tmp_path / "run")] if argv[0] == "train" and "--out-dir" not in argv else argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_duration_parsing():
    assert parse_duration("90") == 90 and parse_duration("5m") == 300 and parse_duration("1.5h") == 5400


@pytest.mark.parametrize("command, flags", [
    (["train"], ["--model-type", "--preset", "--model FIELD=VALUE", "--data", "--lr", "--optimizer", "--schedule",
                 "--time-budget DURATION", "--save-interval", "--parallel", "--fsdp-local", "--no-consolidate",
                 "--config FILE", "--resume"]),
    (["finetune"], ["BASE", "--lora-target", "--lora-rank", "--lr", "--max-steps", "--parallel", "--resume"]),
])
def test_help_lists_the_flat_flags_grouped_by_section(capsys, monkeypatch, command, flags):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and all(f in text for f in flags), text
    assert "optimizer options" in text and "schedule options" in text  # a group per section
    assert "--optimizer.lr" not in text and "--lora.rank" not in text
