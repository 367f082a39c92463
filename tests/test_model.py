"""Invariants of the forward pass: causality, every byte predicted, any length, byte 0 counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from bytelm import ConfigError, Megabyte, MegabyteConfig, TransformerConfig

P = MegabyteConfig.from_name("tiny").patch_size


@pytest.mark.parametrize("k", [0, 1, P - 1, P, P + 1, 2 * P - 1, 2 * P, 5 * P + 2])
def test_causality(model, k):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 6 * P + 3))
    y = x.clone()
    y[:, k] = (y[:, k] + 97) % 256
    a, b = model(x), model(y)
    assert torch.equal(a[:, : k + 1], b[:, : k + 1]), "a byte influenced its own or an earlier prediction"
    assert not torch.allclose(a[:, k + 1 :], b[:, k + 1 :]), "later predictions ignore the changed byte"


def test_first_byte_predicted_from_nothing(model):
    x = torch.randint(0, 256, (3, 2 * P + 1))
    logits = model(x)[:, 0]
    assert torch.allclose(logits, logits[:1].expand_as(logits))


@pytest.mark.parametrize("T", [1, P - 1, P, P + 1, 3 * P + 2])
def test_any_length_is_a_prefix_of_the_longest(model, T):
    """model(x[:, :T]) equals model(x)[:, :T] for lengths that are, or are not, multiples of the patch size."""
    torch.manual_seed(2)
    x = torch.randint(0, 256, (2, 8 * P))
    full = model(x)
    assert torch.allclose(model(x[:, :T]), full[:, :T], atol=1e-5)


def test_loss_counts_every_byte_including_the_first_and_zero(model):
    x = torch.tensor([[0, 0, 5, 0, 255, 0, 0, 1, 0]])
    logits = model(x)
    manual = F.cross_entropy(logits[0], x[0])  # all 9 positions, byte 0 included
    assert torch.allclose(model.loss(x), manual)
    assert model.loss(x, reduction="none").shape == (9,)


def test_all_zero_sequence_trains(model):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.zeros(4, 3 * P + 1, dtype=torch.long)
    first = model.loss(x).item()
    for _ in range(60):  # byte 0 is a byte like any other: learnable (not a speed test)
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
    last = model.loss(x).item()
    assert first > math.log(256) - 1.0  # near uniform (fan_in init's logits start wider than GPT-2's)
    assert last < 0.1 * first


def test_learns_a_pattern_across_patches():
    """A repeating 5-byte pattern (not aligned to P=4) is learnt: both the global and the local path carry it."""
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([3, 1, 4, 1, 5] * 13).repeat(4, 1)
    for _ in range(120):
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
    with torch.no_grad():
        assert model.loss(x[:, 5:]).item() < 0.2


@pytest.mark.parametrize(
    "x, err, match",
    [
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "sequence length 0"),
        (torch.zeros(1, 2049, dtype=torch.long), ValueError, "max_seq_len=2048"),
        (torch.zeros(8, dtype=torch.long), ValueError, "2-D"),
        (torch.zeros(1, 8), TypeError, "integer"),
        (torch.full((1, 8), 256), ValueError, "0..255"),
        (torch.full((1, 8), -1), ValueError, "0..255"),
        ([[1, 2, 3]], TypeError, "LongTensor"),
    ],
)
def test_bad_input_gets_a_clear_error(model, x, err, match):
    with pytest.raises(err, match=match):
        model(x)


def test_config_presets_and_errors():
    assert MegabyteConfig.from_name("paper-1.3b").global_dim == 2048
    assert TransformerConfig.from_name("tiny", layers=3).layers == 3
    with pytest.raises(ConfigError, match="unknown megabyte preset 'huge'"):
        MegabyteConfig.from_name("huge")
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        MegabyteConfig(patch_size=3, global_dim=64)
    with pytest.raises(ConfigError, match="divisible by local_heads"):
        MegabyteConfig(local_dim=30, local_heads=4)
    with pytest.raises(ConfigError, match="pos_emb"):
        TransformerConfig(pos_emb="alibi")
    with pytest.raises(ConfigError, match="unknown transformer config field"):
        TransformerConfig.from_dict({"dim": 64, "depth": 3})
    with pytest.raises(ConfigError, match="not 'megabyte'"):
        MegabyteConfig.from_dict(TransformerConfig().to_dict())


def test_init_schemes():
    from bytelm import Megabyte, MegabyteConfig

    fan_in = Megabyte(MegabyteConfig.from_name("small"))  # the default scheme: PyTorch's variances, N(0, 1) embeddings
    assert fan_in.config.init == "fan_in"
    qkv = fan_in.local_model.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - (3 * qkv.shape[1]) ** -0.5) < 0.005
    assert abs(fan_in.global_embed.weight.std().item() - 1.0) < 0.05
    gpt2 = Megabyte(MegabyteConfig.from_name("small", init="gpt2"))
    assert abs(gpt2.global_embed.weight.std().item() - 0.02) < 0.002
    proj = gpt2.global_model.blocks[0].mlp.proj.weight
    assert abs(proj.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert MegabyteConfig.from_name("paper-1.3b").init == "gpt2"


@pytest.mark.parametrize("case", ["causal", "mask", "one query"])
def test_cpu_bf16_attention_is_sdpa_to_bf16_rounding(case, monkeypatch):
    """On a CPU in bf16, attention runs as matmuls + softmax (2-3x faster there than SDPA's fused kernel): the same
    function as SDPA, forward and backward, and over long key sequences SDPA again."""
    from bytelm.nn import attention

    torch.manual_seed(0)
    T, S = {"causal": (11, 11), "mask": (5, 9), "one query": (1, 7)}[case]
    q, k, v = (torch.randn(2, 3, n, 16, requires_grad=True) for n in (T, S, S))
    mask = None
    if case == "mask":
        mask = torch.rand(T, S) > 0.3
        mask[:, 0] = True
    causal = case == "causal"
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    monkeypatch.setattr(F, "scaled_dot_product_attention", None)  # the matmul path must not call it
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    got = attention.attend(qb, kb, vb, mask, causal)
    grads = torch.autograd.grad(got.float().square().sum(), (qb, kb, vb))
    assert (got.float() - ref).abs().max() < 0.03
    assert all((g.float() - r).abs().max() < 0.1 * r.abs().max() for g, r in zip(grads, ref_grads, strict=True))
    with pytest.raises(TypeError):  # fp32, and bf16 past the key limit, go through SDPA (here: None)
        attention.attend(q, k, v, mask, causal)
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_KEYS", S - 1)
    with pytest.raises(TypeError):
        attention.attend(qb, kb, vb, mask, causal)
