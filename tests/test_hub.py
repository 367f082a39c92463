"""The Hugging Face Hub format: model cards, hub ids from the local hub cache (offline), strict loading of hub folders,
and `bytelm push` against a local stand-in for the Hub. Nothing here touches the network (sockets are blocked)."""

import fnmatch
import hashlib
import json
import math
import shutil
import socket
import sysconfig
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file, save_file

import bytelm
from bytelm import CheckpointError, HubError, Megabyte, MegabyteConfig
from bytelm.cli import main
from bytelm.hub import is_hub_id
from bytelm.hub import remote as hub_mod
from bytelm.training import TrainConfig, Trainer

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any attempt to reach the network fails loudly; the hub cache is a fresh folder; offline mode is on."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny(seed=0) -> Megabyte:
    torch.manual_seed(seed)
    return Megabyte(MegabyteConfig.from_name("tiny")).eval()


def cache_model(model, repo_id: str, root: Path, rev: str = REV) -> Path:
    """Lay a model out in the hub cache as huggingface_hub does: models--org--name/{snapshots/<rev>/, refs/main}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


# --- model cards ---------------------------------------------------------------------------------------------------
def test_saved_folder_is_a_hub_model_repository(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m", val_bpb=2.34567, data="train: 1 MB of code | val: 50 KB", name="tiny-code")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "bytelm" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation" and {"bytelm", "megabyte"} <= set(card.data.tags)
    [result] = card.data.eval_results
    assert result.metric_type == "bits_per_byte" and result.metric_value == pytest.approx(2.3457)
    assert result.dataset_name == "train: 1 MB of code | val: 50 KB" and result.dataset_split == "validation"
    assert f"{model.num_params():,} parameters" in card.text
    plain = ModelCard.load(model.save_pretrained(tmp_path / "plain") / "README.md")
    assert plain.data.eval_results is None and plain.data.library_name == "bytelm"  # no bpb when not known


def test_checkpoint_card_records_the_runs_validation_bpb(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py", data / "argparse.py")
    trainer = Trainer(TrainConfig.flat(preset="tiny", data=[str(data)], out_dir=str(tmp_path / "run"), seq_len=64,
                                       batch_size=2, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1,
                                       save_interval=4, sample_bytes=0, val_fraction=0.2), log=lambda *_: None)
    trainer.run()
    card = ModelCard.load(tmp_path / "run" / "checkpoints" / "step-0000004" / "README.md")
    [result] = card.data.eval_results
    step, loss = trainer.last_val
    assert step == 4 and result.metric_value == pytest.approx(round(loss / math.log(2), 4))
    assert result.dataset_name == trainer.split_info and "argparse.py" in result.dataset_name
    assert card.data.model_name == "run"


# --- hub ids -------------------------------------------------------------------------------------------------------
def test_hub_ids_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("my-org/model.v2")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert not is_hub_id("runs/x")  # a local folder wins
    assert not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("name") and not is_hub_id("./a/b")


def test_hub_id_loads_offline_from_the_cache(tmp_path):
    model = tiny()
    cache_model(model, "org/tiny", tmp_path / "hf" / "hub")
    loaded = bytelm.load("org/tiny")
    x = torch.randint(0, 256, (2, 30))
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(Megabyte.from_pretrained("org/tiny", revision=REV)(x), model(x))
    with pytest.raises(HubError, match=r"org/other is neither a local folder nor in the local hub cache .*"
                       "HF_HUB_OFFLINE is set"):
        bytelm.load("org/other")


def test_hub_cache_env_is_read_at_call_time(tmp_path, monkeypatch):
    model = tiny()
    cache_model(model, "org/tiny", tmp_path / "elsewhere")
    with pytest.raises(HubError, match="nor in the local hub cache"):
        bytelm.load("org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    assert set(bytelm.load("org/tiny").state_dict()) == set(model.state_dict())


def test_online_without_network_falls_back_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_mod.offline()
    cache_model(tiny(), "org/tiny", tmp_path / "hf" / "hub")
    assert bytelm.load("org/tiny").config == tiny().config  # the Hub is unreachable (sockets blocked): the cache


def test_hub_folders_load_strictly(tmp_path):
    """huggingface_hub's mixin loader would ignore a missing or extra weight; bytelm's refuses both."""
    snap = cache_model(tiny(), "org/broken", tmp_path / "hf" / "hub")
    state = load_file(snap / "model.safetensors")
    state["extra.weight"] = torch.zeros(2)
    state.pop("lm_head.weight")
    save_file(state, snap / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing weights: lm_head.weight .* unexpected weights: extra.weight"):
        bytelm.load("org/broken")


def test_cli_uses_hub_ids(tmp_path, capsys):
    cache_model(tiny(), "org/tiny", tmp_path / "hf" / "hub")
    assert main(["generate", "org/tiny", "--prompt", "ab", "--max-bytes", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["eval", "org/nothing"]) == 2
    err = capsys.readouterr().err
    assert "org/nothing is neither a local folder nor in the local hub cache" in err and err.count("\n") == 1


# --- push ----------------------------------------------------------------------------------------------------------
class LocalHub:
    """A stand-in for the Hub: create_repo and upload_folder write into the local hub cache, as a download would."""

    def __init__(self, cache: Path):
        self.cache, self.calls = cache, []

    def __call__(self, token=None):  # replaces huggingface_hub.HfApi(token=...)
        self.calls.append(("HfApi", {"token": token}))
        return self

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, folder_path, repo_id, allow_patterns, **kw):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "allow_patterns": allow_patterns, **kw}))
        files = sorted(p for p in Path(folder_path).iterdir()
                       if any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns))
        rev = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "snapshots" / rev).mkdir(parents=True)
        for p in files:
            shutil.copy(p, repo / "snapshots" / rev / p.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(rev)
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/{rev}"})()


@pytest.fixture
def local_hub(tmp_path, monkeypatch) -> LocalHub:
    fake = LocalHub(tmp_path / "hf" / "hub")
    monkeypatch.setattr(hub_mod, "HfApi", fake)
    return fake


def test_push_a_run_folder_then_load_it_by_id(tmp_path, local_hub, capsys):
    model = tiny()
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000010"
    model.save_pretrained(ckpt)
    for junk in ("optimizer.safetensors", "trainer_state.json"):  # a checkpoint's training state stays home
        (ckpt / junk).write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000010\n")

    assert main(["push", str(tmp_path / "run"), "me/tiny", "--private", "--token", "hf_test"]) == 0
    assert "https://hub.invalid/me/tiny/commit/" in capsys.readouterr().out
    calls = dict(local_hub.calls)
    assert calls["HfApi"] == {"token": "hf_test"}
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    uploaded = local_hub.cache / "models--me--tiny" / "snapshots"
    assert sorted(p.name for p in next(uploaded.iterdir()).iterdir()) == ["README.md", "config.json",
                                                                           "model.safetensors"]
    x = torch.randint(0, 256, (1, 20))
    assert torch.equal(bytelm.load("me/tiny")(x), model(x))  # what was pushed loads back by its id


def test_push_writes_a_card_when_missing_and_refuses_broken_folders(tmp_path, local_hub):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "README.md").unlink()
    bytelm.push(tmp_path / "m", "me/m")
    assert ModelCard.load(tmp_path / "m" / "README.md").data.library_name == "bytelm"
    state = load_file(tmp_path / "m" / "model.safetensors")
    state.pop("lm_head.weight")
    save_file(state, tmp_path / "m" / "model.safetensors")
    n = len(local_hub.calls)
    with pytest.raises(CheckpointError, match="missing weights: lm_head.weight"):
        bytelm.push(tmp_path / "m", "me/m")
    assert len(local_hub.calls) == n  # nothing was uploaded
    with pytest.raises(HubError, match="not a hub repository id"):
        bytelm.push(tmp_path / "m", "no-slash")


def test_push_an_adapter_folder(tmp_path, local_hub):
    pytest.importorskip("peft")
    from bytelm.finetune import apply_lora, save_adapter

    base = tiny()
    cache_model(base, "org/base", tmp_path / "hf" / "hub")
    peft_model = apply_lora(base, "local", rank=2, base="org/base")
    save_adapter(peft_model, tmp_path / "adapter", base.config, "org/base", None)
    (tmp_path / "adapter" / "junk.bin").write_bytes(b"x")
    bytelm.push(tmp_path / "adapter", "me/adapter")
    [upload] = [c for name, c in local_hub.calls if name == "upload_folder"]
    assert "adapter_model.safetensors" in upload["allow_patterns"] and "junk.bin" not in upload["allow_patterns"]
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "org/base" and "lora" in card.data.tags
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"
    merged = bytelm.load_adapter("me/adapter", merge=True)  # adapter and base both by hub id, offline
    assert merged.config == base.config
    save_adapter(peft_model, tmp_path / "local", base.config, str(tmp_path / "base"), None)
    with pytest.warns(UserWarning, match="not a hub id: whoever uses it from the Hub will have to name its base"):
        bytelm.push(tmp_path / "local", "me/local")


def test_push_names_the_hub_base_of_a_local_fine_tune(tmp_path, local_hub, capsys):
    """An adapter of a local base: --base-model names the base's hub id in what goes up (the card's base_model:, the
    config's base), the local folder stays as it is, and what was pushed loads by id on that base."""
    pytest.importorskip("peft")
    from bytelm.finetune import apply_lora, save_adapter, weights_fingerprint

    base = tiny()
    base.save_pretrained(tmp_path / "base")
    cache_model(base, "org/base", tmp_path / "hf" / "hub")  # the same base, on the Hub
    peft_model = apply_lora(base, "local", rank=2, base=str(tmp_path / "base"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    adapter = save_adapter(peft_model, tmp_path / "adapter", base.config, str(tmp_path / "base"),
                           weights_fingerprint(tiny()))
    assert ModelCard.load(adapter / "README.md").data.base_model is None  # a path is no base_model for the Hub
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    assert main(["push", str(adapter), "me/adapter", "--base-model", "org/base"]) == 0
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    uploaded = next((local_hub.cache / "models--me--adapter" / "snapshots").iterdir())
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.base_model == "org/base" and str(tmp_path / "base") not in card.text
    assert json.loads((uploaded / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"
    x = torch.randint(0, 256, (1, 30))
    assert torch.equal(bytelm.load_adapter("me/adapter")(x), bytelm.load_adapter(adapter)(x))

    Megabyte(MegabyteConfig.from_name("tiny", global_layers=3)).save_pretrained(tmp_path / "deeper")
    cache_model(bytelm.load(tmp_path / "deeper"), "org/deeper", tmp_path / "hf" / "hub")
    with pytest.raises(bytelm.AdapterError, match=r"made for another base .*global_layers 2 vs 3"):
        bytelm.push(adapter, "me/adapter", base_model="org/deeper")
    with pytest.raises(HubError, match="not a hub id"):
        bytelm.push(adapter, "me/adapter", base_model=str(tmp_path / "base"))
    with pytest.warns(UserWarning, match="org/elsewhere could not be read"):  # offline and not cached: unchecked
        bytelm.push(adapter, "me/adapter", base_model="org/elsewhere")


def test_push_failure_is_one_line(tmp_path, monkeypatch, capsys):
    class Refusing:
        def __init__(self, token=None):
            pass

        def create_repo(self, *a, **kw):
            error = HfHubHTTPError.__new__(HfHubHTTPError)  # its __init__ wants an HTTP response: skip it
            Exception.__init__(error, "403 Forbidden: you have no write access to me/tiny\nmore detail")
            raise error

    monkeypatch.setattr(hub_mod, "HfApi", Refusing)
    tiny().save_pretrained(tmp_path / "m")
    assert main(["push", str(tmp_path / "m"), "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert "push to me/tiny failed: 403 Forbidden" in err and err.count("\n") == 1
