"""lm-evaluation-harness against a live `bytelm serve`, with the harness's defaults (`--model local-completions`,
tokenizer found through vLLM's endpoints): a small local task of each kind, written here (nothing is downloaded),
at batch size 4 (prompt lists) and 1. Its accuracy is the model's own choice by summed logprob, and its bits per byte
and word perplexity are the evaluation module's over the same documents (every byte scored from the empty context,
the first one too: the harness's prefix token is <|endoftext|>, 256, the start of the stream)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from test_serve import KEY, Server

from benchmarks.lm_eval_tasks import write_tasks
from bytelm import Megabyte, MegabyteConfig
from bytelm.evaluation import evaluate

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

CONTEXT = 256  # the model's max_seq_len

DOCS = ["def main():\n    print('héllo, wörld')\n", "The quick brown fox jumps over the lazy dog.",
        "x" * 200, "  leading spaces, trailing newline\n\n", "数字 1 2 3"]
QUESTIONS = [("2 + 2 =", [" 4", " 5", " fish"]), ("import", [" os", " sys", "ant", " re"]),
             ("def f(x):\n    return", [" x", " None", " x * 2"]), ("The capital of France is", [" Paris", " Rome"]),
             ("for i in", [" range(10):", " []:", " x"]), ("héllo", [" wörld", " world", "!"])]

# One process runs the harness at both batch sizes (it imports once). The API key reaches it as the OpenAI client's
# environment variable (completions) and as auth_token (its remote tokenizer).
HARNESS = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
url, folder, tasks, key, context = sys.argv[1:6]
out = {}
tasks_here = TaskManager(include_path=folder, include_defaults=False)  # indexing lm-eval's thousands of tasks: slow
for batch in (4, 1):
    r = simple_evaluate(model="local-completions", tasks=tasks.split(","), batch_size=batch,
                        model_args={"base_url": url + "/v1/completions", "max_length": int(context), "auth_token": key},
                        task_manager=tasks_here, bootstrap_iters=0, log_samples=False)
    out[batch] = r["results"]
print("RESULTS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", max_seq_len=CONTEXT)).eval()
    return model.save_pretrained(tmp_path_factory.mktemp("lmeval") / "tiny"), model


def _loglikelihood(model, context: bytes, continuation: bytes) -> float:
    """Summed log p of the continuation's bytes after the context, from the model's full forward."""
    x = torch.tensor([list(context + continuation)])
    with torch.no_grad():
        lp = torch.log_softmax(model(x)[0].float(), dim=-1).gather(1, x.view(-1, 1)).view(-1)
    return float(lp[len(context):].sum())


def test_harness_scores_what_the_model_computes(folder, tmp_path):
    path, model = folder
    # answers: the model's own pick for even questions, another choice for odd ones, so accuracy is not 0 or 1
    questions, want_acc, want_norm = [], [], []
    for i, (context, choices) in enumerate(QUESTIONS):
        ll = [_loglikelihood(model, context.encode(), c.encode()) for c in choices]
        pick = max(range(len(choices)), key=ll.__getitem__)
        norm = max(range(len(choices)), key=lambda j: ll[j] / len(choices[j]))  # lm-eval: per character
        answer = pick if i % 2 == 0 else (pick + 1) % len(choices)
        questions.append({"context": context, "choices": choices, "answer": answer})
        want_acc.append(pick == answer)
        want_norm.append(norm == answer)
    names = write_tasks(tmp_path / "tasks", DOCS, questions, prefix="tiny")
    nats = sum(evaluate(model, d.encode(), seq_len=CONTEXT).nats for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    n_words = sum(len(re.split(r"\s+", d)) for d in DOCS)  # lm-eval's word count

    server = Server(path, "--max-streams", "8")
    try:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-c", HARNESS, server.url, str(tmp_path / "tasks"), ",".join(names), KEY,
                              str(CONTEXT)],
                             capture_output=True, text=True, env=env, timeout=600, start_new_session=True)
    finally:
        server.kill()
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(line[len("RESULTS "):])
    for batch in ("4", "1"):
        docs, mc = results[batch][names[0]], results[batch][names[1]]
        assert mc["acc,none"] == pytest.approx(sum(want_acc) / len(QUESTIONS), abs=1e-12)
        assert mc["acc_norm,none"] == pytest.approx(sum(want_norm) / len(QUESTIONS), abs=1e-12)
        assert docs["bits_per_byte,none"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
        assert docs["word_perplexity,none"] == pytest.approx(math.exp(nats / n_words), rel=1e-4)
    assert 0 < sum(want_acc) < len(QUESTIONS)
