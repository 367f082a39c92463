"""LoRA fine-tuning: the right layers, merged equals unmerged, only adapters train, a fine-tune helps, adapters round
trip and resume exactly, and a mismatched base gets a clear error."""

import json
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bytelm
from bytelm import ByteTransformer, CheckpointError, Megabyte, MegabyteConfig, TransformerConfig
from bytelm.cli import main
from bytelm.data import load_split
from bytelm.evaluation import evaluate
from bytelm.finetune import (
    FinetuneConfig,
    FinetuneTrainer,
    LoraError,
    apply_lora,
    load_adapter,
    save_adapter,
    target_modules,
    weights_fingerprint,
)
from bytelm.training import TrainConfig, Trainer

pytest.importorskip("peft")
quiet = lambda *_: None  # noqa: E731
COMMON = dict(seq_len=128, batch_size=4, log_interval=1000, eval_batches=4, sample_bytes=0, val_fraction=0.1)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    """Two real corpora: Python code (the json and email packages) and English prose (pydoc's topics)."""
    root = tmp_path_factory.mktemp("corpora")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email"):
        shutil.copytree(stdlib / pkg, root / "code" / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "text").mkdir()
    shutil.copy(stdlib / "pydoc_data" / "topics.py", root / "text" / "topics.py")
    return root / "code", root / "text"


@pytest.fixture(scope="module")
def base_run(corpora, tmp_path_factory) -> Path:
    """A tiny MEGABYTE trained for 100 steps on code."""
    out = tmp_path_factory.mktemp("base") / "run"
    Trainer(TrainConfig.flat(preset="tiny", data=[str(corpora[0])], out_dir=str(out), max_steps=100, warmup_steps=10,
                             lr=3e-3, eval_interval=100, save_interval=100, **COMMON), log=quiet).run()
    return out


@pytest.fixture(scope="module")
def finetuned(base_run, corpora, tmp_path_factory):
    """That base fine-tuned with LoRA for 30 steps on prose: (trainer, run folder)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = FinetuneConfig.flat(base=str(base_run), data=[str(corpora[1])], out_dir=str(out), max_steps=30,
                              warmup_steps=5, lr=1e-2, eval_interval=15, save_interval=15, **COMMON)
    trainer = FinetuneTrainer(cfg, log=quiet)
    trainer.run()
    return trainer, out


def tiny(cls=Megabyte, **kw):
    torch.manual_seed(0)
    config = (MegabyteConfig if cls is Megabyte else TransformerConfig).from_name("tiny", **kw)
    return cls(config).eval()


def lora_layers(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}


def randomize_adapters(model) -> None:
    """LoRA's B starts at zero (the update is zero): give every adapter a nonzero update."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)


# --- which layers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, stacks", [("global", {"global_model"}), ("local", {"local_model"}),
                                            ("all", {"global_model", "local_model"})])
def test_targets_name_the_right_layers(target, stacks):
    model = tiny()
    apply_lora(model, target, rank=4)
    layers = lora_layers(model)
    expected = {f"{s}.blocks.{i}.{lin}" for s in stacks for i in range(2)
                for lin in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert layers == expected
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable) and trainable
    # r * (in + out) per adapted Linear: the update B A and nothing else
    linears = {n: m for n, m in tiny().named_modules() if n in expected}
    assert sum(p.numel() for p in trainable.values()) == sum(4 * (m.in_features + m.out_features)
                                                             for m in linears.values())


def test_transformer_targets():
    assert lora_layers(apply_lora(tiny(ByteTransformer), "all").get_base_model()) == {
        f"transformer.blocks.{i}.{lin}" for i in range(2) for lin in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    with pytest.raises(LoraError, match="a byte transformer has no local model"):
        apply_lora(tiny(ByteTransformer), "local")
    with pytest.raises(LoraError, match="lora target must be one of global, local, all"):
        target_modules(tiny().config, "both")


# --- merged == unmerged ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Megabyte, ByteTransformer])
def test_merged_equals_unmerged(cls, tmp_path):
    base = tiny(cls, pos_emb="learned", bias=True) if cls is ByteTransformer else tiny(cls)
    base.save_pretrained(tmp_path / "base")
    x = torch.randint(0, 256, (2, 37))
    base_logits = base(x)
    peft_model = apply_lora(base, "all", rank=4, base=str(tmp_path / "base"))
    randomize_adapters(base)
    save_adapter(peft_model, tmp_path / "adapter", base.config, str(tmp_path / "base"), None)

    unmerged = load_adapter(tmp_path / "adapter")
    merged = load_adapter(tmp_path / "adapter", merge=True)
    assert lora_layers(unmerged) and not lora_layers(merged)
    assert set(merged.state_dict()) == set(bytelm.load(tmp_path / "base").state_dict())  # a plain model again
    a, b = unmerged(x), merged(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert (a - base_logits).abs().max() > 1e-2  # the adapters do change the model
    assert unmerged.generate(b"def ", 24, temperature=0) == merged.generate(b"def ", 24, temperature=0)

    # bytelm merge writes a plain, strictly loadable model folder
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    written = bytelm.load(tmp_path / "merged")
    assert torch.allclose(written(x), a, atol=1e-5, rtol=1e-4)


# --- fine-tuning ---------------------------------------------------------------------------------------------------
def test_only_adapter_parameters_change(finetuned, base_run):
    trainer, _ = finetuned
    base = bytelm.load(base_run).state_dict()
    tuned = {k.replace(".base_layer", ""): v for k, v in trainer.model.state_dict().items() if ".lora_" not in k}
    assert set(tuned) == set(base)
    assert all(torch.equal(tuned[k], base[k]) for k in base), "a frozen base weight changed"
    lora_b = [v for k, v in trainer.model.state_dict().items() if ".lora_B." in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "an adapter did not train (B is still zero)"
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert in_optimizer == trainer.trainable_params < trainer.model.num_params() // 4


def test_finetune_lowers_validation_bpb(finetuned, base_run, corpora):
    trainer, out = finetuned
    _, val, _ = load_split([str(corpora[1])], 0.1, None)
    before = evaluate(bytelm.load(base_run), val, seq_len=128, max_bytes=16384).bpb
    after = evaluate(load_adapter(out), val, seq_len=128, max_bytes=16384).bpb
    assert after < before - 0.05, (before, after)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("0,val,")  # the base, scored before the first step
    run = json.loads((out / "run.json").read_text())
    assert run["trainable_params"] == trainer.trainable_params and run["train"]["base"] == str(base_run)


def test_adapter_round_trip(finetuned, base_run):
    trainer, out = finetuned
    ckpt = out / "checkpoints" / "step-0000030"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert "model.safetensors" not in names and "config.json" not in names  # only the adapter is saved
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == str((base_run / "checkpoints" / "step-0000100").resolve())
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    x = torch.randint(0, 256, (2, 50))
    loaded = load_adapter(out)  # a run folder: its latest checkpoint; the base it records
    assert torch.equal(loaded(x), trainer.model.eval()(x))
    with pytest.raises(CheckpointError, match="holds a LoRA adapter, not a model"):
        bytelm.load(out)


def test_peft_loads_the_runs_adapter_folder(finetuned, monkeypatch):
    """A run folder's adapter/ is its latest checkpoint's adapter, alone: peft's AutoPeftModel builds base and adapter
    from it (import_allowlist=["bytelm"]) into the model bytelm.load_adapter gives."""
    from huggingface_hub import ModelCard
    from peft import AutoPeftModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft looks for a tokenizer on the Hub when the folder has none
    _, out = finetuned
    adapter, ckpt = out / "adapter", out / "checkpoints" / "step-0000030"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "bytelm_adapter.json", "README.md"}  # no optimizer state
    assert all((adapter / p.name).read_bytes() == (ckpt / p.name).read_bytes() for p in adapter.iterdir())
    with pytest.raises(ValueError, match=r"import_allowlist=\['bytelm'\]"):  # peft's own refusal names the fix
        AutoPeftModel.from_pretrained(str(adapter))
    peft_model = AutoPeftModel.from_pretrained(str(adapter), import_allowlist=["bytelm"]).eval()
    x = torch.randint(0, 256, (2, 50))
    assert torch.equal(peft_model(x), load_adapter(out)(x))
    card = ModelCard.load(adapter / "README.md").data
    assert card.library_name == "peft" and {"lora", "peft", "bytelm"} <= set(card.tags)
    assert card.base_model is None  # a local base: the Hub refuses anything but a hub id there (see test_hub.py)


def test_resume_equals_uninterrupted(tmp_path, corpora):
    tiny().save_pretrained(tmp_path / "base")
    cfg = lambda name: FinetuneConfig.flat(base=str(tmp_path / "base"), data=[str(corpora[1])],  # noqa: E731
                                           out_dir=str(tmp_path / name), max_steps=8, warmup_steps=2, lr=1e-2,
                                           eval_interval=4, save_interval=4, **{**COMMON, "eval_batches": 1})
    a = FinetuneTrainer(cfg("a"), log=quiet)
    a.run()
    b = FinetuneTrainer(cfg("b"), log=quiet)
    b.run(until_step=4)
    c = FinetuneTrainer(cfg("b"), resume=True, log=quiet)
    assert c.step == 4 and c.base_val == pytest.approx(b.base_val, abs=1e-5)  # read back from metrics.csv
    c.run()
    wa, wc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(wa[k], wc[k]) for k in wa), "the resumed fine-tune diverged"


# --- mismatches ----------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path) -> Path:
    """An adapter (nonzero) made for a tiny MEGABYTE saved in tmp_path/base."""
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    peft_model = apply_lora(base, "global", rank=4, base=str(tmp_path / "base"))
    randomize_adapters(base)
    return save_adapter(peft_model, tmp_path / "adapter", base.config, str(tmp_path / "base"),
                        weights_fingerprint(tiny()))


def test_base_of_another_config_is_refused(adapter, tmp_path):
    tiny(global_layers=3).save_pretrained(tmp_path / "deeper")
    with pytest.raises(LoraError, match=r"made for another base .*global_layers 2 vs 3"):
        load_adapter(adapter, base=tmp_path / "deeper")
    tiny(ByteTransformer).save_pretrained(tmp_path / "transformer")
    with pytest.raises(LoraError, match="a megabyte model, not a transformer"):
        load_adapter(adapter, base=tmp_path / "transformer")


def test_base_with_other_weights_is_warned_about(adapter, tmp_path):
    torch.manual_seed(5)
    Megabyte(MegabyteConfig.from_name("tiny")).save_pretrained(tmp_path / "other")
    with pytest.warns(UserWarning, match="same config but other weights"):
        load_adapter(adapter, base=tmp_path / "other")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(adapter)  # its own base: no warning


def test_adapter_made_elsewhere_is_checked_strictly(adapter):
    (adapter / "bytelm_adapter.json").unlink()  # no recorded base config: the weights must fit exactly
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(LoraError, match=r"does not fit this base with its LoRA config: wrong shapes"):
        load_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(adapter / "adapter_model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(LoraError, match="missing weights: base_model.model.global_model"):
        load_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": r"decoder\.layers\.\d+"}))
    with pytest.raises(LoraError, match="does not fit a megabyte model"):
        load_adapter(adapter)


def test_broken_adapter_folders(adapter, tmp_path):
    with pytest.raises(LoraError, match="nor a fine-tune run"):
        load_adapter(tmp_path / "base")
    with pytest.raises(LoraError, match="does not exist"):
        load_adapter(tmp_path / "nothing")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match="has no adapter_model.safetensors"):
        load_adapter(adapter)


def test_saving_a_model_with_adapters_in_it_is_refused(adapter, tmp_path):
    with pytest.raises(CheckpointError, match="carries LoRA adapters"):
        load_adapter(adapter).save_pretrained(tmp_path / "x")


def test_missing_peft_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(LoraError, match=r"pip install 'bytelm\[lora\]'"):
        apply_lora(tiny())


# --- the command line ----------------------------------------------------------------------------------------------
def test_cli_finetune_generate_eval_merge(tmp_path, corpora, capsys):
    tiny().save_pretrained(tmp_path / "base")
    out = tmp_path / "ft"
    assert main(["finetune", str(tmp_path / "base"), "--data", str(corpora[1]), "--max-steps", "6",
                 "--warmup-steps", "2", "--lora-target", "local", "--lora-rank", "2", "--lora-alpha", "4",
                 "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--eval-interval", "6",
                 "--save-interval", "3", "--sample-bytes", "0", "--val-fraction", "0.1", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trainable of" in text and "(the base:" in text
    config = json.loads((out / "checkpoints" / "step-0000006" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["target_modules"].startswith("local_model")
    assert main(["train", "--resume", "--out-dir", str(out)]) == 2  # the wrong command for this run
    assert "bytelm finetune" in capsys.readouterr().err
    assert main(["finetune", "--resume", "--out-dir", str(out), "--max-steps", "8"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    capsys.readouterr()

    # generate/eval with --adapter: MODEL defaults to the base the adapter records
    assert main(["generate", "--adapter", str(out), "--prompt", "The ", "--max-bytes", "16", "--temperature", "0",
                 "--out", str(tmp_path / "a.bin")]) == 0
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(out), "--prompt", "The ", "--max-bytes", "16",
                 "--temperature", "0", "--out", str(tmp_path / "b.bin")]) == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() == load_adapter(out).generate(b"The ", 16, temperature=0)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--json", "--seq-len", "64", "--max-bytes", "4000"]) == 0
    assert "topics.py" in json.loads(capsys.readouterr().out)["data"]  # the fine-tune's split, not the base's
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    scores = []
    for model in (["--adapter", str(out)], [str(tmp_path / "merged")]):
        capsys.readouterr()
        assert main(["eval", *model, "--data", str(corpora[1]), "--split", "all", "--json", "--seq-len", "64",
                     "--max-bytes", "4000"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["bpb"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)  # merged == unmerged, end to end


@pytest.mark.parametrize("argv, message", [
    (["finetune"], "name the model to fine-tune"),
    (["finetune", "{transformer}", "--lora-target", "local", "--data", "{data}"], "has no local model"),
    (["finetune", "{tmp}/nothing"], "does not exist"),
    (["generate", "{transformer}", "--adapter", "{adapter}"], "a megabyte model, not a transformer"),
    (["eval", "--adapter", "{tmp}/base"], "neither a LoRA adapter folder"),
    (["generate"], "name a MODEL"),
    (["generate", "{tmp}/adapter"], "holds a LoRA adapter, not a model"),
    (["merge", "{adapter}", "--base", "{transformer}", "--out", "{tmp}/m"], "made for another base"),
])
def test_cli_errors_are_one_clear_line(argv, message, adapter, tmp_path, corpora, capsys):
    tiny(ByteTransformer).save_pretrained(tmp_path / "transformer")
    subs = {"{transformer}": str(tmp_path / "transformer"), "{adapter}": str(adapter), "{tmp}": str(tmp_path),
            "{data}": str(corpora[1])}
    for k, v in subs.items():
        argv = [a.replace(k, v) for a in argv]
    if argv[0] == "finetune":
        argv += ["--out-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
