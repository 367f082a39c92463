"""Property-based: random values for every flag of `generate`, `eval` and a bounded `train`, and random config
dicts. Whatever comes in, bytelm either does the job (exit 0, with all the output asked for) or says in one line
what is wrong (exit 2): never a traceback, never exit 0 with less output than asked, and within a time bound.

BYTELM_FUZZ_EXAMPLES sets the examples per property (default 40), BYTELM_FUZZ_RANDOM=1 draws new ones; `pytest -s`
prints how many cases ran and how they ended."""

import collections
import contextlib
import dataclasses
import io
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bytelm  # noqa: E402
from bytelm.cli import main  # noqa: E402
from bytelm.cli.eval import EvalArgs  # noqa: E402
from bytelm.cli.generate import GenerateArgs  # noqa: E402
from bytelm.generation import engine as engine_module  # noqa: E402

EXAMPLES = int(os.environ.get("BYTELM_FUZZ_EXAMPLES", "40"))
# the same cases every run (CI stays deterministic); BYTELM_FUZZ_RANDOM=1 draws new ones
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), database=None,
                derandomize=not os.environ.get("BYTELM_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = bytelm.MegabyteConfig.from_name("tiny", max_seq_len=320)  # the default 256 bytes fit

# values people type, and values that break things: huge, tiny, negative, non-finite, not numbers at all
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "-1", "2", "64", "1e-45", "1e-300", "1e300", "nan", "inf", "-inf", "0.5", "1.0",
                     "2**64", "0x10", "", " ", "1_000"]),
)
TEXT = st.text(max_size=12)
VALUE = st.one_of(NUMBERS, TEXT)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


CASES: collections.Counter = collections.Counter()  # (command, exit code) -> cases run (`pytest -s` prints them)


def cli(argv: list[str]) -> tuple[int, str, str]:
    """`bytelm ARGV` in-process: (exit code, stdout, stderr). Any exception but SystemExit escapes: a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help and friends
            rc = e.code if isinstance(e.code, int) else 2
    CASES[argv[0], rc] += 1
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\ncases run:", ", ".join(f"{cmd} exit {rc}: {n}" for (cmd, rc), n in sorted(CASES.items())))


def assert_refused_in_one_line(rc: int, err: str, command: str) -> None:
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"bytelm {command}: error: ") and "Traceback" not in err, err


def plausible(type_: str):
    """Values of the kind a flag takes, so that many cases get past parsing and do the work (exit 0) too."""
    if "float" in type_:
        return st.floats(0, 2).map(lambda v: f"{v:g}")
    if "int" in type_:
        return st.integers(0, 64).map(str)
    return TEXT


def argv_from(draw, fields, special) -> list[str]:
    """A random subset of the flags, each with a random value (special ones from their own strategies): a plausible
    value three times in four, anything (VALUE) otherwise."""
    argv = []
    for f in draw(st.lists(st.sampled_from(fields), unique=True, max_size=5)):
        type_ = str(f.type)
        if f.name in special:
            value = draw(special[f.name])
            if value is not None:
                argv += [flag(f.name), *([value] if isinstance(value, str) else value)]
        elif type_ in ("bool", "<class 'bool'>"):
            argv.append(draw(st.sampled_from([flag(f.name), "--no-" + f.name.replace("_", "-")])))
        else:
            good = draw(st.integers(0, 3)) > 0
            argv += [flag(f.name), draw(plausible(type_) if good else VALUE)]
    return argv


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    bytelm.Megabyte(TINY).save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_bytes(b"hello world, this is some text to score and train on. " * 200)
    (root / "data" / "b.py").write_bytes(b"def f(x):\n    return x + 1\n" * 200)
    (root / "prompt.bin").write_bytes(b"\x00\xff abc")
    (root / "a-folder").mkdir()
    return root


def paths(place: Path):
    return st.sampled_from([str(place / "prompt.bin"), str(place / "a-folder"), str(place / "missing"), "/dev/null",
                            "/dev/zero", "/dev/full", str(place / "data"), "", str(place / "model")])


class Spy:
    """Records the last Output of every engine stream the CLI reads (what it was given to print)."""

    def __init__(self, monkeypatch) -> None:
        self.last = None
        real = engine_module.Engine.stream

        def stream(engine, prompt, params):
            for out in real(engine, prompt, params):
                self.last = (params, out)
                yield out

        monkeypatch.setattr(engine_module.Engine, "stream", stream)


@st.composite
def generate_argv(draw, place):
    fields = [f for f in dataclasses.fields(GenerateArgs) if f.name != "model"]
    # the paths and devices that work are drawn most often, so that many cases run to the end
    special = {"prompt_file": st.one_of(st.just(str(place / "prompt.bin")), paths(place)),
               "out": st.one_of(st.just(str(place / "out.bin")), paths(place)),
               "adapter": st.one_of(st.none(), st.none(), paths(place)),
               "device": st.sampled_from(["cpu", "auto", "cpu", "auto", "cuda", "cuda:7", "tpu", ""]),
               "stop": st.lists(TEXT, max_size=3).map(lambda xs: xs or None)}
    model = draw(st.sampled_from([str(place / "model")] * 4 + [str(place / "missing"), str(place / "data")]))
    return [model, *argv_from(draw, fields, special)]


def test_generate_flags(place, monkeypatch):
    spy = Spy(monkeypatch)

    @FUZZ
    @given(generate_argv(place))
    def check(argv):
        (place / "out.bin").unlink(missing_ok=True)
        spy.last = None
        rc, _, err = cli(["generate", *argv])
        if rc != 0:
            assert_refused_in_one_line(rc, err, "generate")
            return
        if {"--help", "-h"} & set(argv):  # tyro printed help (a value "-h" reads as the flag, as in argparse)
            return
        params, last = spy.last
        assert last.finish_reason in ("length", "stop"), last
        if last.finish_reason == "length":  # exit 0 means every byte asked for was generated
            assert last.generated == params.max_new_bytes
        if "--out" in argv and Path(argv[argv.index("--out") + 1]).is_file():
            assert Path(argv[argv.index("--out") + 1]).stat().st_size <= params.max_new_bytes

    check()


@st.composite
def eval_argv(draw, place):
    fields = [f for f in dataclasses.fields(EvalArgs) if f.name not in ("model", "max_bytes")]
    special = {"data": st.lists(st.one_of(st.just(str(place / "data")), paths(place)), min_size=1, max_size=2),
               "adapter": st.one_of(st.none(), st.none(), paths(place)),
               "device": st.sampled_from(["cpu", "cpu", "cuda", "x"]),
               "mode": st.sampled_from(["chunked", "sliding", "strided", "other"])}
    # --max-bytes bounds the work: a fuzzed one is kept within the data's size
    bound = ["--max-bytes", draw(st.sampled_from(["1", "64", "300", "0", "-5", "x"]))]
    return [str(place / "model"), *bound, *argv_from(draw, fields, special)]


def test_eval_flags(place):
    @FUZZ
    @given(eval_argv(place))
    def check(argv):
        rc, out, err = cli(["eval", *argv])
        if rc != 0:
            assert_refused_in_one_line(rc, err, "eval")
        elif not {"--help", "-h"} & set(argv):
            assert "bits per byte" in out or '"bpb"' in out

    check()


Flag = collections.namedtuple("Flag", "name type")  # as argv_from reads a dataclass field


def run_flags(config_cls) -> list[Flag]:
    """Every flag of a run config (its flat names, across its sections) with its field's type."""
    out = []
    for name, (section, field) in config_cls.flat_names().items():
        owner = config_cls if section is None else config_cls.sections()[section]
        out.append(Flag(name, owner.field_types()[field]))
    return out


# a bounded train: the flags that set how much work a run does are drawn from small ranges; every other flag of
# TrainConfig gets anything
BOUNDED = {"max_steps": st.sampled_from(["1", "2"]), "grad_accum": st.sampled_from(["1", "2", "0", "-1"]),
           "eval_batches": st.sampled_from(["1", "2", "0"]), "time_budget": st.sampled_from(["2", "0", "1s", "-1"]),
           "sample_bytes": st.sampled_from(["0", "8", "-3"]), "batch_size": NUMBERS, "seq_len": NUMBERS}


@st.composite
def train_argv(draw, place, out: Path):
    from bytelm.training import TrainConfig

    skip = {"model", "model_type", "preset", "data", "out_dir", "max_steps", "config", "resume", "compile", "device",
            "precision"}
    fields = [f for f in run_flags(TrainConfig) if f.name not in skip]
    special = {**BOUNDED}
    base = ["--preset", "tiny", "--model", "max_seq_len=64", "--data", str(place / "data"), "--out-dir", str(out),
            "--max-steps", draw(BOUNDED["max_steps"]), "--precision", "fp32", "--eval-batches", "1"]
    return [*base, *argv_from(draw, fields, special)]


def test_bounded_train_flags(place, tmp_path):
    out = tmp_path / "run"

    @settings(parent=FUZZ, max_examples=max(EXAMPLES // 3, 5))
    @given(train_argv(place, out))
    def check(argv):
        shutil.rmtree(out, ignore_errors=True)
        rc, stdout, err = cli(["train", *argv])
        if rc != 0:
            assert_refused_in_one_line(rc, err, "train")
            return
        if {"--help", "-h"} & set(argv):
            return
        assert "done: step" in stdout
        assert bytelm.io.latest_checkpoint(out) is not None  # exit 0 leaves a model that loads
        bytelm.load(out)

    check()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=6)


@st.composite
def config_dict(draw):
    """A saved model config, with some fields replaced by anything, dropped, or added."""
    d = json.loads(json.dumps({**TINY.to_dict(), "bytelm_version": bytelm.__version__}))
    for key in draw(st.lists(st.sampled_from(sorted(d)), unique=True, max_size=3)):
        action = draw(st.sampled_from(["replace", "drop"]))
        if action == "drop":
            d.pop(key)
        else:
            d[key] = draw(st.one_of(JSON, st.integers(-(2**40), 2**40)))
    if draw(st.booleans()):
        d[draw(st.text(max_size=8))] = draw(JSON)
    return d


def test_model_config_dicts(place, tmp_path):
    """A model folder whose config.json is anything: generate works or says what is wrong, in one line."""
    folder = tmp_path / "m"
    shutil.copytree(place / "model", folder)

    @FUZZ
    @given(config_dict())
    def check(d):
        (folder / "config.json").write_text(json.dumps(d))
        rc, out, err = cli(["generate", str(folder), "--max-bytes", "4", "--prompt", "ab"])
        if rc != 0:
            assert_refused_in_one_line(rc, err, "generate")

    check()


def test_train_config_dicts(tmp_path):
    """TrainConfig.from_dict of anything: a config or a ConfigError, nothing else."""
    from bytelm.training import TrainConfig

    names = [*TrainConfig.flat_names(), *TrainConfig.sections()]

    @FUZZ
    @given(st.dictionaries(st.sampled_from(names) | st.text(max_size=5), JSON, max_size=5))
    def check(d):
        try:
            TrainConfig.from_dict(d)
            CASES["TrainConfig.from_dict", 0] += 1
        except bytelm.BytelmError:
            CASES["TrainConfig.from_dict", 2] += 1

    check()
