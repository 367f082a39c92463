import contextlib
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from bytelm import ByteTransformer, Megabyte, MegabyteConfig, TransformerConfig


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny
    models decode fastest on one, and an in-process engine thread and the test's own then do not contend for the
    cores (subprocess servers get OMP_NUM_THREADS=1 for the same reason)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


# Every invariant is checked on both models and both position schemes.
CONFIGS = {
    "megabyte-rope": MegabyteConfig.from_name("tiny"),  # bytelm's default: half a patch of local context, norms
    "megabyte-learned": MegabyteConfig.from_name("tiny", pos_emb="learned", bias=True),
    "megabyte-paper": MegabyteConfig.from_name("tiny", local_context=0, local_norms=False),
    "megabyte-paper-learned": MegabyteConfig.from_name("tiny", pos_emb="learned", bias=True, local_context=0,
                                                       local_norms=False),
    "megabyte-context1": MegabyteConfig.from_name("tiny", local_context=1, local_norms=False),
    "megabyte-context4": MegabyteConfig.from_name("tiny", local_context=4),  # a whole patch
    "megabyte-context6": MegabyteConfig.from_name("tiny", local_context=6, pos_emb="learned"),  # W > P
    "megabyte-ctxglobal": MegabyteConfig.from_name("tiny", context_global=True),
    "megabyte-ctxglobal1": MegabyteConfig.from_name("tiny", local_context=1, context_global=True),
    "megabyte-ctxglobal6": MegabyteConfig.from_name("tiny", local_context=6, context_global=True, bias=True),
    # dynamic patches (bytelm.models.patching): SpaceByte's rule, on random bytes half of them spacelike; BLT's
    # entropy rule, which ends about every third patch of random bytes (see make())
    "megabyte-space": MegabyteConfig.from_name("tiny", patching="space"),
    "megabyte-space-paper": MegabyteConfig.from_name("tiny", patching="space", local_context=0, local_norms=False,
                                                     pos_emb="learned", bias=True),
    "megabyte-entropy": MegabyteConfig.from_name("tiny", patching="entropy", patch_threshold=0.05),
    "transformer-rope": TransformerConfig.from_name("tiny"),
    "transformer-learned": TransformerConfig.from_name("tiny", pos_emb="learned", bias=True),
}


def make(cfg):
    torch.manual_seed(0)
    model = Megabyte(cfg) if isinstance(cfg, MegabyteConfig) else ByteTransformer(cfg)
    if getattr(cfg, "patching", None) == "entropy":
        # an untrained entropy model's entropies are all within ~1e-6 of ln 256 - 0.16, so whether they rise past
        # a threshold is float rounding; sharper logits spread them over 0..5 nats, as a trained one's are
        with torch.no_grad():
            model.entropy_model.head.weight.mul_(30)
    return model.eval()


def decode_and_check(model, state, x: torch.Tensor, full: torch.Tensor, pos: list[int], rows: list[int]) -> None:
    """Feed `rows` of the state their next byte of x, each at its own position pos[r] (advanced), and check every
    row's logits against the full forward's `full` at its new position."""
    from bytelm.nn import Step

    at = [pos[r] for r in rows]
    out = model.decode_step(x[rows, at], state, Step.make(rows, at, max(at) + 1, "cpu"))
    for i, r in enumerate(rows):
        pos[r] += 1
        torch.testing.assert_close(out[i], full[r, pos[r]], atol=1e-4, rtol=1e-4)


def engine_outputs(model, prompts: list[bytes], params, max_streams: int) -> list[bytes]:
    """Every prompt's output, submitted together to one engine of `max_streams` rows and stepped until all finish."""
    from bytelm.generation.engine import Engine

    engine, got = Engine(model, max_streams=max_streams), [bytearray() for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(p, params, lambda o, i=i: got[i].extend(o.data))
    while engine.active or engine.queued:
        engine.step()
    return [bytes(g) for g in got]


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request):
    return make(CONFIGS[request.param])


@pytest.fixture
def megabyte():
    return make(CONFIGS["megabyte-rope"])


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory) -> Path:
    """Real data: the standard library's json and email packages' source (~300 KB of Python)."""
    root = tmp_path_factory.mktemp("code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email"):
        shutil.copytree(stdlib / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant: torchrun starts each rank in a session of its own,
    out of reach of a kill of torchrun's group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_group(cmd: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run` for a command that starts processes of its own (torchrun and its ranks): in a session of its
    own, it and every descendant killed if it outlives `timeout` (a rank stuck in a collective is not left behind).
    Output goes through files, not pipes: a straggler holding a pipe open cannot block the read."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            err.write(f"\n[killed after {timeout:.0f} s]")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
