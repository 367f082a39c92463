"""The package's shape: every module imports on its own (no cycle that only an import order hides), the CLI imports
only what its command needs, and it works where only compiled .pyc files are installed."""

import compileall
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bytelm

SRC = Path(bytelm.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(SRC)], prefix="bytelm."))


def run_python(code: str, *, path: Path | None = None) -> subprocess.CompletedProcess:
    prefix = f"import sys; sys.path.insert(0, {str(path)!r}); " if path else ""
    return subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, timeout=300)


def test_module_list_is_complete():
    assert {"bytelm.cli.train", "bytelm.models.megabyte", "bytelm.nn.attention", "bytelm.api"} <= set(MODULES)
    assert "bytelm.cli.__main__" in MODULES


FORK_EACH = """
import os, sys, traceback
import numpy, safetensors.torch, torch, tqdm, tyro, huggingface_hub  # third-party only: no bytelm module yet
assert not [m for m in sys.modules if m.startswith("bytelm")]
failed, running = 0, []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a fresh process as far as bytelm is concerned: imports exactly this module, then exits
        try:
            __import__(name)
        except BaseException:
            print(name, traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
        os._exit(0)
    running.append(pid)
    if len(running) >= (os.cpu_count() or 1):  # one child per core at a time
        failed += os.waitpid(running.pop(0), 0)[1] != 0
failed += sum(os.waitpid(pid, 0)[1] != 0 for pid in running)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # An import that works only after another module was imported first (a cycle hidden by import order) fails
    # here. Each module gets a process of its own, forked from one that imported torch & co. but no bytelm module.
    modules = [m for m in MODULES if m != "bytelm.cli.__main__"]  # that one runs the CLI when imported
    res = subprocess.run([sys.executable, "-c", FORK_EACH, *modules], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_cli_imports_only_what_its_command_needs():
    probe = ("import sys, io, contextlib; from bytelm.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    assert main(['--version']) == 0\n"
             "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'peft', 'bytelm', "
             "'huggingface_hub', 'tyro'))))")
    loaded = set(run_python(probe).stdout.split())
    assert not {"torch", "peft", "huggingface_hub", "bytelm.training", "bytelm.models"} & loaded, loaded
    probe_help = ("import sys, io, contextlib; from bytelm.cli import main\n"
                  "with contextlib.redirect_stdout(io.StringIO()):\n"
                  "    try:\n        main(['eval', '--help'])\n    except SystemExit:\n        pass\n"
                  "print(' '.join(sorted(m for m in sys.modules if m.startswith(('peft', 'bytelm.')))))")
    loaded = set(run_python(probe_help).stdout.split())
    assert "bytelm.cli.eval" in loaded
    assert not {"peft", "bytelm.training", "bytelm.finetune", "bytelm.cli.train"} & loaded, loaded


def test_the_package_root_imports_names_on_first_use():
    out = run_python("import sys, bytelm; print('bytelm.models' in sys.modules, bytelm.__version__); "
                     "bytelm.Megabyte; print('bytelm.models' in sys.modules)").stdout.split()
    assert out == ["False", bytelm.__version__, "True"]


def test_cli_works_with_only_compiled_files_installed(tmp_path):
    # A wheel built with only .pyc files (or a site-packages whose sources were stripped): no inspect.getsource.
    pkg = tmp_path / "bytelm"
    shutil.copytree(SRC, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(pkg, quiet=1, legacy=True)
    for f in pkg.rglob("*.py"):
        f.unlink()
    res = run_python("from bytelm.cli import main; print(bytelm_file := __import__('bytelm').__file__); "
                     "raise SystemExit(main(['--version']))", path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(pkg / "__init__.pyc"), f"bytelm {bytelm.__version__}"]
    res = run_python("from bytelm.cli import main; main(['train', '--help'])", path=tmp_path)
    assert res.returncode == 0 and "--max-steps" in res.stdout, res.stderr


@pytest.mark.parametrize("command", ["train", "finetune", "eval", "generate", "merge", "push", "presets"])
def test_every_command_has_help(command, capsys):
    from bytelm.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"bytelm {command}" in capsys.readouterr().out
