"""Dynamic patching's rules against plain-Python references, the global model run once per patch while decoding, the
entropy model learning on its own loss only, and the config's refusals. (Causality, cached == full and batched ==
alone are checked for every rule with every other model: tests/conftest.py's CONFIGS.)"""

import math
import random

import pytest
import torch
from conftest import CONFIGS, make

from bytelm import ConfigError, Megabyte, MegabyteConfig
from bytelm.models import byte_loss
from bytelm.models.patching import entropy
from bytelm.nn import Step

TEXT = (b"def main(argv):\n    return sorted(set(argv), key=len)  # 42 \xc3\xa9t\xc3\xa9, \"quoted\"...\n"
        b"In the beginning God created the heaven and the earth.   Supercalifragilistic!")


def spacelike_ref(b: int) -> bool:
    return not (chr(b).isascii() and chr(b).isalnum()) and not 0x80 <= b <= 0xBF


def ends_ref(natural: list[bool], P: int) -> list[bool]:
    """A patch ends where the rule says, or when it holds P bytes: one byte at a time."""
    out, n = [], 0
    for nat in natural:
        n += 1
        out.append(nat or n == P)
        if out[-1]:
            n = 0
    return out


@pytest.mark.parametrize("P", [4, 8])
def test_space_rule_is_spacebytes(P):
    model = Megabyte(MegabyteConfig.from_name("tiny", patching="space", patch_size=P))
    rng = random.Random(0)
    for seq in (TEXT, bytes(rng.randrange(256) for _ in range(200))):
        natural = [spacelike_ref(b) and not (i > 0 and spacelike_ref(seq[i - 1])) for i, b in enumerate(seq)]
        got = model.patch_ends(torch.tensor([list(seq)]))[0].tolist()
        assert got == ends_ref(natural, P)
    # words and the space after them
    ends = model.patch_ends(torch.tensor([list(b"the heaven and")]))[0].tolist()
    cuts = [i + 1 for i, e in enumerate(ends) if e]
    assert [b"the heaven and"[a:b] for a, b in zip([0] + cuts, cuts + [14], strict=True)] == (
        [b"the ", b"heaven ", b"and"] if P == 8 else [b"the ", b"heav", b"en ", b"and"])


def test_entropy_rule_is_blts_monotonic_rule():
    model = make(CONFIGS["megabyte-entropy"])
    c = model.config
    x = torch.tensor([list(TEXT)])
    h = entropy(model.entropy_model(x))[0].tolist()
    natural = [i > 0 and h[i] - h[i - 1] > c.patch_threshold for i in range(len(h))]
    got = model.patch_ends(x)[0].tolist()
    assert got == ends_ref(natural, c.patch_size)
    assert 0 < sum(natural) < len(h) - 1  # the rule really placed borders of its own


@pytest.mark.parametrize("name", ["megabyte-space", "megabyte-entropy"])
def test_decoding_runs_the_global_model_once_per_patch(name):
    """Fed one byte at a time, a row runs the global model exactly at the patches' ends (plus once at the start)."""
    model = make(CONFIGS[name])
    x = torch.tensor([list(TEXT[:120])])
    ends = model.patch_ends(x)[0].tolist()
    with torch.inference_mode():
        s = model.new_state(1, 128)
        model.prefill(x[:, :1], s, Step.make([0], [0], 1, "cpu"))
        assert s.global_steps == 1
        for t in range(1, 120):
            before = s.global_steps
            model.decode_step(x[:, t], s, Step.make([0], [t], t + 1, "cpu"))
            assert s.global_steps - before == int(ends[t]), t
    assert 10 < sum(ends) < 100


def test_the_entropy_model_learns_on_its_own_loss_only():
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", patching="entropy")).train()
    x = torch.tensor([list(TEXT[:64])] * 2)
    loss = model(x, loss="mean")
    # the value is the byte loss of the model's logits: the entropy model's loss adds gradient, never value
    assert loss.item() == byte_loss(model(x), x).item()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.entropy_model.parameters())
    for p in model.parameters():
        p.grad = None
    byte_loss(model(x), x).backward()  # the patches it places pass no gradient back to it
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.entropy_model.parameters())
    # and its own gradient is its next-byte loss's
    e_logits = model.entropy_model(x)
    e_loss = model.entropy_model.loss(e_logits, x).mean()
    assert math.isfinite(e_loss.item()) and e_loss.item() > 4  # untrained: about ln 256


@pytest.mark.parametrize("fields, match", [
    (dict(patching="words"), "patching must be one of"),
    (dict(patching="space", context_global=True), "context_global is for fixed patches"),
    (dict(patching="entropy", entropy_dim=0), "entropy_dim"),
])
def test_bad_patching_configs_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        MegabyteConfig.from_name("tiny", **fields)


def test_a_config_json_from_before_dynamic_patching_loads_as_fixed():
    d = MegabyteConfig.from_name("tiny").to_dict()
    for k in ("patching", "patch_threshold", "entropy_dim", "entropy_layers"):
        d.pop(k)
    cfg = MegabyteConfig.from_dict({**d, "bytelm_version": "0.7.0"}, saved=True)
    assert cfg.patching == "fixed" and not cfg.dynamic
