"""Save/load round trip, and a clear error for every way a model folder can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bytelm
from bytelm import ByteTransformer, CheckpointError, Megabyte, MegabyteConfig


def test_round_trip_gives_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = bytelm.load(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    x = torch.randint(0, 256, (2, 33))
    assert torch.equal(loaded(x), model(x))
    assert type(model).from_pretrained(tmp_path).config == model.config


def test_no_pickle_in_the_folder(megabyte, tmp_path):
    megabyte.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "megabyte" and cfg["patch_size"] == megabyte.config.patch_size
    assert set(load_file(tmp_path / "model.safetensors")) == set(megabyte.state_dict())


def test_missing_folder_and_files(megabyte, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        bytelm.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        bytelm.load(tmp_path)
    megabyte.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        bytelm.load(tmp_path)


def test_config_of_another_model_type(megabyte, tmp_path):
    megabyte.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'megabyte' model .* not a ByteTransformer"):
        ByteTransformer.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        bytelm.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        bytelm.load(tmp_path)


def test_weights_of_the_wrong_shape(megabyte, tmp_path):
    megabyte.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "local_dim": 64}))
    msg = r"wrong shapes: .*local_embed.weight: file \(256, 32\) vs model \(256, 64\)"
    with pytest.raises(CheckpointError, match=msg):
        Megabyte.from_pretrained(tmp_path)


def test_missing_and_extra_weights(megabyte, tmp_path):
    megabyte.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("lm_head.weight")
    state["surprise"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing weights: lm_head.weight .* unexpected weights: surprise"):
        bytelm.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        bytelm.load(tmp_path)


def test_save_overwrites_atomically(megabyte, tmp_path):
    megabyte.save_pretrained(tmp_path)
    megabyte.save_pretrained(tmp_path)  # again, over the first
    # no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_config_saved_before_a_field_existed_keeps_its_design(tmp_path):
    # bytelm 0.1.0 wrote no local_context / local_norms: its MEGABYTE was the paper's local model
    paper = MegabyteConfig.from_name("tiny", local_context=0, local_norms=False)
    torch.manual_seed(0)
    Megabyte(paper).save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["local_context"], cfg["local_norms"]
    (tmp_path / "old" / "config.json").write_text(json.dumps({**cfg, "bytelm_version": "0.1.0"}))
    assert bytelm.load(tmp_path / "old").config == paper  # and its weights load strictly
    # a config of this version without them (hand-written) gets today's defaults
    fresh = MegabyteConfig.from_dict({**cfg, "bytelm_version": bytelm.__version__})
    assert fresh.local_context == fresh.patch_size // 2 and fresh.local_norms
