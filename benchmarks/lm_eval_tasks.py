"""Two small local lm-evaluation-harness tasks, written as YAML + JSONL into a folder (`lm_eval --include_path`):
nothing is downloaded. The README's "Evaluating with lm-evaluation-harness" runs them against `bytelm serve`.

    python -m benchmarks.lm_eval_tasks OUT [--docs 40] [--questions 100]

`bytelm_docs` (loglikelihood_rolling: bits_per_byte, byte_perplexity, word_perplexity): held-out Python standard
library source (the embedded corpus's validation files, which the quickstart never trains on): the first DOC_BYTES
bytes of each. Each is scored from the empty context in one window (lm-eval's max_length 1024 leaves
1022 positions for a document: one for its prefix token, one for the byte it generates). The same documents are
written as files to OUT/docs/: all of DOC_BYTES bytes, so `bytelm eval --data OUT/docs --seq-len 1022` scores each
in a window of its own, from the empty context, exactly as lm-eval does.

`bytelm_nextline` (multiple_choice: acc, acc_norm): a held-out file's lines so far (up to CONTEXT_BYTES), and four
candidate next lines: the true one and three lines from other held-out files. Chance is 25%.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from pathlib import Path

DOC_BYTES = 1022  # a document fits one window of lm-eval's max_length=1024 (see the module's docstring)
CONTEXT_BYTES = 600


def write_tasks(folder: Path, docs: list[str], questions: list[dict], prefix: str = "bytelm") -> list[str]:
    """`{prefix}_docs` over `docs` and `{prefix}_nextline` over `questions` ({"context", "choices", "answer"}) in
    `folder`; returns the task names. Choices follow the context directly (target_delimiter ""), and the context's
    trailing whitespace is lm-eval's to move into each choice (TemplateLM._encode_pair)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}_docs", f"{prefix}_nextline"]
    for name, rows in zip(names, ([{"text": d} for d in docs], questions), strict=True):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / f"{names[0]}.yaml").write_text(
        f"task: {names[0]}\n" + common.format(path=folder / f"{names[0]}.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        + "".join(f"  - metric: {m}\n" for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")))
    (folder / f"{names[1]}.yaml").write_text(
        f"task: {names[1]}\n" + common.format(path=folder / f"{names[1]}.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        + 'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\nmetric_list:\n'
        + "".join(f"  - metric: {m}\n" for m in ("acc", "acc_norm")))
    return names


def held_out_files() -> list[Path]:
    """The embedded corpus's validation files: what `bytelm train` without --data never trains on."""
    from bytelm.data.corpus import _val_sides, default_corpus_files

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(f, f.relative_to(root).as_posix()) for f in default_corpus_files() if f.stat().st_size > 0]
    return [f for (f, _), v in zip(files, _val_sides(files, 0.05), strict=True) if v]


def _docs(files: list[Path], n: int) -> list[str]:
    """n documents of exactly DOC_BYTES bytes of UTF-8 text: the first DOC_BYTES bytes of each long enough file."""
    out = []
    for f in files:
        data = f.read_bytes()[:DOC_BYTES]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # a character cut in two
            continue
        if len(data) == DOC_BYTES and "\r" not in text:  # (a universal-newline reader would change \r's bytes)
            out.append(text)
        if len(out) == n:
            break
    return out


def _questions(files: list[Path], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = {f: f.read_text("utf-8", errors="replace").splitlines(keepends=True) for f in files}
    pool = [(f, ln) for f, ls in lines.items() for ln in ls if 8 <= len(ln.strip()) <= 80]
    out = []
    while len(out) < n:
        f = rng.choice(files)
        ls = lines[f]
        if len(ls) < 10:
            continue
        i = rng.randrange(5, len(ls))
        answer = ls[i].rstrip("\n")
        if not 8 <= len(answer.strip()) <= 80:
            continue
        context = "".join(ls[:i])[-CONTEXT_BYTES:]
        others = [ln.rstrip("\n") for g, ln in rng.sample(pool, 20) if g != f and ln.rstrip("\n") != answer][:3]
        choices = others + [answer]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--questions", type=int, default=100)
    args = ap.parse_args()
    files = held_out_files()
    docs = _docs(files, args.docs)
    names = write_tasks(args.out, docs, _questions(files, args.questions))
    (args.out / "docs").mkdir(exist_ok=True)
    for i, d in enumerate(docs):  # the same documents as files: `bytelm eval --data OUT/docs --seq-len 1022`
        (args.out / "docs" / f"{i:04d}.py").write_bytes(d.encode("utf-8"))
    print(f"{', '.join(names)} in {args.out}: {len(docs)} documents of {DOC_BYTES} bytes from {len(files)} held-out "
          "files, and the next-line questions")


if __name__ == "__main__":
    main()
