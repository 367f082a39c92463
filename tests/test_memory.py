"""Sizes are checked before they are used: a model folder whose config or weights do not fit (or do not agree), a batch,
a decoding state or LoRA adapters too large for the device are refused with one line giving the estimate, before
anything is allocated; and the estimates are close to what is really allocated."""

import json
import os
import resource
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import bytelm
from bytelm import CheckpointError, ConfigError, MemoryLimitError
from bytelm.cli import main
from bytelm.devices import available_memory, format_bytes, parse_size
from bytelm.generation.engine import Engine
from bytelm.models import memory

TINY = bytelm.MegabyteConfig.from_name("tiny", max_seq_len=64)
ESTIMATE = "needs about"


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    bytelm.Megabyte(TINY).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def limit(monkeypatch):
    """What the checks take as available: 1 GB, whatever this machine has (so that the tests mean the same
    everywhere)."""
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "1GB")


def one_line_error(capsys, argv, *messages) -> str:
    t = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 30  # refused before any work (a slow CI machine still does this in seconds)
    for message in messages:
        assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"bytelm {argv[0]}: error: ")
    return err


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del cfg[k]
    (folder / "config.json").write_text(json.dumps(cfg))


# --- available memory -----------------------------------------------------------------------------------------------
def test_sizes_read_and_written():
    assert parse_size("8GB") == 8 * 10**9 and parse_size("512 MiB") == 512 * 2**20 and parse_size("1.5e9") == 1.5e9
    assert parse_size("100") == 100 and parse_size("2t") == 2 * 10**12
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size("lots")
    assert format_bytes(13.2e12) == "13.2 TB" and format_bytes(331e6) == "331 MB" and format_bytes(104e9) == "104 GB"
    assert format_bytes(512) == "512 bytes"


def test_available_memory(monkeypatch):
    monkeypatch.delenv("BYTELM_MEMORY_LIMIT", raising=False)
    n, _ = available_memory("cpu")
    if sys.platform.startswith("linux"):
        assert 0 < n < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "8GB")
    assert available_memory("cpu") == (8 * 10**9, "BYTELM_MEMORY_LIMIT")
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "off")  # the escape hatch: nothing is refused
    assert available_memory("cpu")[0] is None
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "plenty")
    with pytest.raises(ConfigError, match="BYTELM_MEMORY_LIMIT='plenty' is not a size"):
        available_memory("cpu")


# --- model folders --------------------------------------------------------------------------------------------------
def test_a_config_whose_sizes_disagree_with_its_weights_is_named(model_dir, capsys):
    edit_config(model_dir, global_dim=2**20, global_heads=2**10, max_seq_len=2**30)  # 2**20 x 3 * 2**20 matrices
    one_line_error(capsys, ["generate", str(model_dir), "--prompt", "a"],
                   "model.safetensors does not match the model in its config",
                   "global_embed.weight: file (256, 16) vs model (256, 262144)")


def test_a_config_too_large_for_memory_is_refused_with_the_estimate(model_dir, capsys, limit):
    # the weights agree (rope tables are not saved), but 2**30 positions of rope tables are 137 GB
    edit_config(model_dir, max_seq_len=2**31 - 1)
    err = one_line_error(capsys, ["generate", str(model_dir), "--prompt", "a"],
                         f"bytelm generate: error: loading {model_dir} needs about 137 GB (model.safetensors 578 kB, "
                         "the model 137 GB) but cpu has 1 GB available (BYTELM_MEMORY_LIMIT)",
                         "(BYTELM_MEMORY_LIMIT overrides the check)")
    assert "the sizes in its config.json" in err


def sparse_weights(folder, config) -> int:
    """A model.safetensors whose header holds every tensor of `config`'s model and whose data is a hole: a file of any
    size that takes no disk and no time to write. Returns its size."""
    state = memory.skeleton(config).state_dict()
    header, offset = {}, 0
    for name, t in state.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def test_weights_that_agree_with_their_config_but_do_not_fit_are_refused(model_dir, capsys, limit):
    big = TINY.replace(global_dim=4096, global_heads=16)  # 1.6 GB of weights, 3.2 GB to load
    (model_dir / "config.json").write_text(json.dumps({**big.to_dict(), "bytelm_version": bytelm.__version__}))
    size = sparse_weights(model_dir, big)
    assert size > 1.6e9
    one_line_error(capsys, ["eval", str(model_dir)], f"loading {model_dir} needs about 3.22 GB (model.safetensors "
                   "1.61 GB, the model 1.61 GB) but cpu has 1 GB available")


def test_integer_and_bool_weights_are_refused(model_dir, capsys):
    state = load_file(model_dir / "model.safetensors")
    state["global_pad"] = state["global_pad"].long()
    state["lm_head.weight"] = state["lm_head.weight"] > 0
    save_file(state, model_dir / "model.safetensors")
    one_line_error(capsys, ["generate", str(model_dir), "--prompt", "a"],
                   "weights that are not floating point: global_pad (I64), lm_head.weight (BOOL)")
    with pytest.raises(CheckpointError, match="not floating point"):
        bytelm.load(model_dir)


def test_bf16_weights_still_load(model_dir):
    state = {k: v.bfloat16() for k, v in load_file(model_dir / "model.safetensors").items()}
    save_file(state, model_dir / "model.safetensors")
    assert bytelm.load(model_dir).dtype == torch.float32


def test_a_saved_config_missing_a_field_is_refused(model_dir, capsys):
    edit_config(model_dir, global_layers=None)
    one_line_error(capsys, ["generate", str(model_dir), "--prompt", "a"],
                   f"{model_dir / 'config.json'}: megabyte config lacks field(s) global_layers: a saved config names "
                   "every field")
    # presets and --model overrides stay partial dicts
    assert bytelm.MegabyteConfig.from_dict({"patch_size": 4}).global_layers == bytelm.MegabyteConfig().global_layers


def test_a_saved_config_may_lack_init(model_dir):
    edit_config(model_dir, init=None)  # it does not matter to a loaded model
    assert bytelm.load(model_dir).config == TINY


@pytest.mark.parametrize("field, value, message", [
    ("global_dim", 2**40, "global_dim must be at most 2**31 - 1, got 1099511627776"),
    ("max_seq_len", 10**30, "max_seq_len must be at most 2**31 - 1"),
    ("mlp_ratio", 1e300, "global_dim * mlp_ratio"),
    ("mlp_ratio", float("inf"), "mlp_ratio must be finite, got inf"),
    ("rope_base", float("nan"), "rope_base must be finite, got nan"),
])
def test_sizes_past_any_model_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        bytelm.MegabyteConfig.from_name("tiny", **{field: value})


# --- decoding state -------------------------------------------------------------------------------------------------
def test_engine_refuses_a_state_it_cannot_hold(limit):
    model = bytelm.Megabyte(TINY)
    with pytest.raises(MemoryLimitError, match=r"a decoding state \(KV caches\) for 10,000,000 streams of up to 64 "
                                               r"bytes needs about 210 GB but cpu has 1 GB available "
                                               r"\(BYTELM_MEMORY_LIMIT\); lower max_streams \(bytelm serve: "
                                               r"--max-streams\)"):
        Engine(model, max_streams=10_000_000)
    with pytest.raises(MemoryLimitError, match="for 1,000,000 streams"):  # and so does every new_state
        model.new_state(1_000_000, 64)
    Engine(model, max_streams=4)  # what fits is not refused


def test_serve_refuses_max_streams_it_cannot_hold(model_dir, capsys, limit):
    pytest.importorskip("uvicorn")
    one_line_error(capsys, ["serve", str(model_dir), "--max-streams", "10000000"],
                   "a decoding state (KV caches) for 10,000,000 streams", "--max-streams")


def test_state_estimate_is_exact():
    for model in (bytelm.Megabyte(TINY), bytelm.ByteTransformer(bytelm.TransformerConfig.from_name("tiny"))):
        real = memory._tensors(model.new_state(3, 50), set())
        assert model.state_nbytes(3, 50) == real > 0
        assert memory.weights_nbytes(model.config) == sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


# --- training and fine-tuning ---------------------------------------------------------------------------------------
def test_train_refuses_a_batch_it_cannot_hold(tmp_path, capsys):
    out = tmp_path / "run"
    # the check comes before the data is read: 10 bytes, shorter than one window, are not even looked at (only the
    # name is, for what kind of data it is: bytelm.data.resolve_media)
    (tmp_path / "short.txt").write_bytes(b"0123456789")
    one_line_error(capsys, ["train", "--batch-size", "10000000", "--data", str(tmp_path / "short.txt"), "--out-dir",
                            str(out)],
                   "bytelm train: error: this run needs about 621 TB (weights 14.5 MB, gradients 14.5 MB, optimizer "
                   "14.8 MB, activations 621 TB for batch 10,000,000 x 1,024) but cpu has",
                   "; lower --batch-size (and raise --grad-accum to keep the batch) or the model's size "
                   "(BYTELM_MEMORY_LIMIT overrides the check)")
    assert not out.exists()


def test_memory_limit_is_the_escape_hatch(tmp_path, capsys, monkeypatch):
    (tmp_path / "short.txt").write_bytes(b"0123456789")
    argv = ["train", "--preset", "tiny", "--batch-size", "64", "--data", str(tmp_path / "short.txt"), "--out-dir",
            str(tmp_path / "run")]
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "10MB")
    one_line_error(capsys, argv, "but cpu has 10 MB available (BYTELM_MEMORY_LIMIT)")
    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "off")
    one_line_error(capsys, argv, "fewer than one window")  # past the check: now the data is read


def test_finetune_refuses_a_rank_it_cannot_hold(model_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    one_line_error(capsys, ["finetune", str(model_dir), "--lora-rank", "100000000", "--data", str(model_dir),
                            "--out-dir", str(tmp_path / "ft")],
                   "bytelm finetune: error: this fine-tune needs about", "lower --lora-rank, or --batch-size")
    assert not (tmp_path / "ft").exists()


def test_apply_lora_refuses_a_rank_it_cannot_hold(limit):
    pytest.importorskip("peft")
    from bytelm.finetune import apply_lora

    model = bytelm.Megabyte(TINY)
    with pytest.raises(MemoryLimitError, match="LoRA adapters of rank 100,000,000 needs about 1.2.* TB"):
        apply_lora(model, "all", rank=100_000_000)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_nothing_is_allocated_under_a_small_address_space(model_dir, tmp_path):
    """Under `ulimit -v` 3 GB each refusal still comes as its one line (not a failed allocation), and the checks
    read the limit: what they say is available is at most what it leaves."""
    edit_config(model_dir, max_seq_len=2**31 - 1)
    script = f"""
import sys
from bytelm.cli import main
codes = [main(["train", "--batch-size", "10000000", "--out-dir", {str(tmp_path / 'run')!r}]),
         main(["generate", {str(model_dir)!r}, "--prompt", "a"])]
sys.exit(0 if codes == [2, 2] else 1)
"""
    env = {k: v for k, v in os.environ.items() if k != "BYTELM_MEMORY_LIMIT"}
    limit = 3 * 2**30
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(ESTIMATE in line and "(ulimit -v)" in line for line in lines), run.stderr


# --- the estimates against what is really allocated -----------------------------------------------------------------
def saved_by_autograd(model, x) -> int:
    params = {id(p.untyped_storage()) for p in model.parameters()}
    saved = {}

    def pack(t):
        if id(t.untyped_storage()) not in params:
            saved[id(t.untyped_storage())] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bytelm.models.byte_loss(model(x), x)
    return sum(s.nbytes() for s in saved.values())


@pytest.mark.parametrize("cfg", [TINY.replace(max_seq_len=512), bytelm.TransformerConfig.from_name("tiny")],
                         ids=["megabyte", "transformer"])
def test_activation_estimate_is_what_autograd_saves(cfg):
    """On the meta device, without allocating, within 10% of what a real CPU forward pass saves for the backward."""
    torch.manual_seed(0)
    model = bytelm.build(cfg).train()
    real = saved_by_autograd(model, torch.randint(0, 256, (2, 512)))
    estimate = memory.training_activations(cfg, 512).nbytes(2)
    assert 0.9 < estimate / real < 1.1, (estimate, real)


PEAK_SCRIPT = """
import sys, torch
from bytelm.models import build, byte_loss, MegabyteConfig
from bytelm.training import TrainConfig
from bytelm.training.memory import training_parts
from bytelm.training.optim import make_optimizer

def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

cfg, batch, seq = MegabyteConfig.from_name("tiny"), 16, 1024
x = torch.randint(0, 256, (batch, seq))
warm = build(MegabyteConfig.from_name("tiny"))
byte_loss(warm(x[:1, :64]), x[:1, :64]).backward()  # torch's own lazy state, before the baseline
del warm
base = rss("VmRSS")
model = build(cfg).train()
opt = make_optimizer(model, TrainConfig().optimizer)
byte_loss(model(x), x).backward()
opt.step()  # the optimizer's moments are made here
peak = rss("VmHWM") - base
estimate = sum(n for _, n in training_parts(cfg, batch, seq, "muon", "fp32", torch.device("cpu")))
print(estimate / peak)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_training_estimate_is_close_to_the_peak_of_a_real_step():
    """The estimate of a training step (MEGABYTE tiny, batch 16 x 1024, Muon, fp32) against the growth of the peak
    RSS of a real step, in a fresh process: measured 0.86x (MEGABYTE small at batch 8: 1.03x for one step, 0.90x for
    two). It should stay near the real peak, at or a little under it, so that no run that fits is refused."""
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr
    ratio = float(run.stdout.split()[-1])
    assert 0.5 < ratio < 1.25, ratio


# --- training state per rank under DDP and FSDP2 (bytelm.training.memory.state_bytes) -------------------------------
def _tiny(model_type):
    return bytelm.models.config_class(model_type).from_name("tiny", max_seq_len=64)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_state_shrinks_with_the_ranks_and_ddp_does_not(optimizer):
    from bytelm.training.memory import state_bytes

    cfg = bytelm.MegabyteConfig.from_name("paper-1.3b")
    rows = sum(p[0].numel() for p in memory.skeleton(cfg).parameters())  # one row of every parameter: the padding
    one = state_bytes(cfg, optimizer, "fsdp", 1, "bf16")
    sharded = ("params", "grads", "optimizer")
    for world in (2, 3, 4, 8):
        fsdp = state_bytes(cfg, optimizer, "fsdp", world, "bf16")
        for part in sharded:  # 1/N of the whole, plus at most one padded row of each tensor (x 3: AdamW's moments)
            assert 0 <= fsdp[part] - one[part] / world <= 3 * 4 * rows, (part, world)
        assert fsdp["unsharded"] == state_bytes(cfg, optimizer, "fsdp", 2, "bf16")["unsharded"]  # not sharded
        assert fsdp["muon"] == one["muon"]
        assert fsdp["unsharded"] < one["unsharded"] / 10  # a block at a time, not autocast's copy of every weight
        state = sum(one[p] for p in sharded)
        assert abs(sum(fsdp[p] for p in sharded) - state / world) / (state / world) < 0.01
        assert fsdp["total"] == sum(fsdp[p] for p in (*sharded, "unsharded", "muon"))
    single, ddp = (state_bytes(cfg, optimizer, "ddp", w, "bf16") for w in (1, 2))
    assert ddp["grads"] == 2 * single["grads"]  # DDP's buckets
    assert all(state_bytes(cfg, optimizer, "ddp", w, "bf16") == ddp for w in (4, 8))  # nothing shrinks
    assert 5.5e9 < single["params"] < 5.7e9  # 1.4B fp32 parameters


def _state_of_a_step(model, optimizer):
    """A built model and its optimizer after one step: (param, [its optimizer state tensors shaped like it])."""
    from bytelm.training.config import OptimizerSection
    from bytelm.training.optim import make_optimizer

    opt = make_optimizer(model, OptimizerSection(name=optimizer))
    model.loss(torch.randint(0, 256, (1, 64))).backward()
    opt.step()
    parts = opt.parts.values() if hasattr(opt, "parts") else [opt]
    state = {id(p): [v for v in s.values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
             for part in parts for p, s in part.state.items()}
    return [(p, state[id(p)]) for p in model.parameters()]


@pytest.mark.parametrize("model_type", ["megabyte", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_state_bytes_is_a_count_of_a_built_model(model_type, optimizer):
    """The formula against a real tiny model and its optimizer's state after a step, sharded as FSDP2 shards (chunk
    0 of torch.chunk on dim 0: the padded size every rank allocates), so that it cannot drift from what is built."""
    from bytelm.nn import Block
    from bytelm.training.memory import state_bytes

    torch.manual_seed(0)
    cfg = _tiny(model_type)
    model = bytelm.build(cfg)
    held = _state_of_a_step(model, optimizer)
    for world in (1, 2, 3, 8):
        def shard(t, world=world):
            return t.element_size() * torch.chunk(t.detach(), world)[0].numel()

        fsdp = state_bytes(cfg, optimizer, "fsdp", world, "bf16")
        assert fsdp["params"] == sum(shard(p) for p, _ in held) == fsdp["grads"]
        assert fsdp["optimizer"] == sum(shard(v) for _, state in held for v in state)
        ddp = state_bytes(cfg, optimizer, "ddp", world, "fp32")
        assert ddp["params"] == sum(p.nbytes for p, _ in held)
        assert ddp["grads"] == sum(p.grad.nbytes for p, _ in held) * (2 if world > 1 else 1)
        assert ddp["optimizer"] == sum(v.nbytes for _, state in held for v in state)
        assert ddp["unsharded"] == 0
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    assert state_bytes(cfg, optimizer, "fsdp", 4, "bf16")["unsharded"] == 2 * (root + largest)
    assert state_bytes(cfg, optimizer, "fsdp", 4, "fp32")["unsharded"] == 4 * (root + largest)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert state_bytes(cfg, optimizer, "ddp", 2, "bf16")["unsharded"] == 2 * linear  # autocast's copies
    assert (state_bytes(cfg, optimizer, "ddp", 1)["muon"] > 0) == (optimizer == "muon")


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak of the bytes of the tensors made under it and still alive (each storage once; ops in place on a
    tensor made before it are not new memory)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def _free(self, ptr):
        self.refs[ptr][1] -= 1
        if self.refs[ptr][1] == 0:
            self.live -= self.refs.pop(ptr)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                 if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:  # not in place
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.refs:
                    self.refs[ptr] = [t.untyped_storage().nbytes(), 0]
                    self.live += self.refs[ptr][0]
                    self.peak = max(self.peak, self.live)
                self.refs[ptr][1] += 1
                weakref.finalize(t, self._free, ptr)
        return out


@pytest.mark.parametrize("shape", [(256, 64), (64, 64)])
def test_muon_scratch_is_what_a_muon_step_allocates(shape):
    """The Muon term is the peak of what one fp32 Muon step on the matrix allocates (the update, Newton-Schulz's
    iterates and Gram matrices): 3 m n + 2 min(m, n)^2 fp32 elements, 3.5x the matrix for a 4:1 one, 5x square."""
    from bytelm.training.memory import _muon_scratch
    from bytelm.training.optim import Fp32Muon

    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    opt = Fp32Muon([p], lr=1e-3, adjust_lr_fn="match_rms_adamw")
    opt.step()  # the momentum is made here
    with _LiveBytes() as live:
        opt.step()
    expected = 4 * _muon_scratch(shape)
    assert expected <= live.peak <= expected + 1024, (live.peak, expected)  # + a few scalars


SHARD_SCRIPT = """
import json
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from bytelm.models import MegabyteConfig, build
from bytelm.nn import Block

dist.init_process_group("gloo")
torch.manual_seed(0)
model = build(MegabyteConfig.from_name("tiny", max_seq_len=64))
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for m in list(model.modules()):
    if isinstance(m, Block):
        fully_shard(m, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.loss(torch.randint(0, 256, (2, 64))).backward()
opt.step()
params = list(model.parameters())

def allocated(ts):  # bytes of the distinct storages (FSDP2's padded shards; one reduce-scatter buffer per unit)
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

out = dict(rank=dist.get_rank(), rows={n: p.to_local().shape[0] for n, p in model.named_parameters()},
           params=allocated(p.to_local() for p in params), grads=allocated(p.grad.to_local() for p in params),
           optimizer=allocated(v.to_local() for s in opt.state.values() for v in s.values() if v.dim() > 0))
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 25 s on 2 busy cores at world 2 (each process imports torch.distributed's FSDP and DTensor: 15 s)
@pytest.mark.parametrize("world", [2, 3])  # 3: uneven shards, padded
def test_fsdp_shards_are_what_state_bytes_counts(tmp_path, world):
    """`world` gloo processes fully_shard a tiny MEGABYTE (each block, then the root) and take an AdamW step; each
    rank's allocated parameter, gradient and moment bytes are the formula's (params and grads padded on every rank;
    the moments unpadded, the most on rank 0), and its rows of each parameter torch.chunk's."""
    from bytelm.training.memory import shard_rows, state_bytes

    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    # the processes torchrun would start, without torchrun's own (a second or more of imports on a small machine)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(world)]
    try:
        runs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in runs]
    ranks = sorted((json.loads(line[len("RESULT "):]) for out, _ in runs for line in out.splitlines()
                    if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert len(ranks) == world
    cfg = _tiny("megabyte")
    expected = state_bytes(cfg, "adamw", "fsdp", world)
    shapes = {n: p.shape for n, p in memory.skeleton(cfg).named_parameters()}
    for r in ranks:
        assert r["params"] == expected["params"] and r["grads"] == expected["grads"], r
        assert r["rows"] == {n: shard_rows(s[0], world, r["rank"])[0] for n, s in shapes.items()}
        assert r["optimizer"] <= expected["optimizer"]
    assert ranks[0]["optimizer"] == expected["optimizer"]


def test_parallel_memory_benchmark_writes_its_table(tmp_path):
    from benchmarks import parallel_memory

    payload = parallel_memory.main(["--presets", "megabyte:tiny", "--ranks", "1", "2", "--out", str(tmp_path)])
    md = (tmp_path / "parallel_memory.md").read_text()
    assert "## megabyte `tiny`" in md and md.count("| FSDP2 | 2 |") == 2
    rows = payload["presets"]["megabyte:tiny"]["muon"]
    assert [(r["strategy"], r["ranks"]) for r in rows] == [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
    assert ("megabyte", "paper-1.3b") in parallel_memory.paper_presets()
