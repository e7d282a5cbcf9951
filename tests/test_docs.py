"""The commands the docs show work as written (issue 13: docs that are true).

Every command in a ```bash block of README.md and docs/*.md, and every `$ `-line of
an output block, is classified below: RUN (executed here, cheaply) or a reason it is
skipped. A new command in the docs fails test_every_doc_command_is_classified until
it is added. A RUN command goes through the real Makefile (`make -n` prints what
make would run) and the Python commands are then executed in this process, with the
configuration file and results redirected into a scratch directory; where the docs
show its output, every shown line must appear in the real output.
"""
import contextlib
import importlib
import io
import re
import shlex
import subprocess

import pytest

from adamwprune.config.kconfig import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = "run"
TRAINS = "trains a model (tests/test_engine.py, test_tasks.py and test_matrix.py train every path in seconds)"
NEEDS_RUN = "needs a run or matrix directory the docs leave to the reader (<run>, /path/to/...)"
EXAMPLE_MATRIX = "needs the 10-cell example matrix the example above it trains (1 min 40 s)"
INTERACTIVE = "interactive (a terminal menu or a web dashboard)"
GPU = "needs a GPU (scripts/gpu_session.sh runs it on a lent GPU machine)"
SLURM = ("needs the local Slurm cluster and minutes of cells; tests/test_slurm.py runs a matrix through "
         "scripts/slurm-local.sh")
DATA = "tokenizes the 1.2 M-token corpus (about a minute); tests/test_tokens.py prepares small shards"

STUDY = "runs a study (hours); tests/test_matrix.py and test_sweep.py run small matrices and grids"
READS_STUDY = "reads the study matrices under results/; tests/test_claims.py judges a real matrix"

COMMANDS = {
    "for p in lenet5-lr-grid lenet5-compare gpt2-char-lr-grid gpt2-char-bitter-lesson lenet5-patterns-dst "
    "gpt2-char-patterns-dst; do": STUDY,
    "make defconfig DEFCONFIG=$p && make JOBS=2 && make summary && make update-graphs": STUDY,
    "done": STUDY,
    "make defconfig DEFCONFIG=gpt2-char-bitter-lesson && make JOBS=2": STUDY,
    "make defconfig DEFCONFIG=gpt2-char-lr-grid && make JOBS=2": STUDY,
    "make defconfig DEFCONFIG=lenet5-compare && make JOBS=2": STUDY,
    "make claims": READS_STUDY,
    ".venv/bin/python scripts/docs_figures.py": READS_STUDY,
    "make demo": "trains the demo (15-40 s); tests/test_engine.py trains LeNet-5 end to end",
    "make check": "is the test suite itself",
    "make list-defconfigs": RUN,
    "make defconfig DEFCONFIG=lenet5-adamw": RUN,
    "make defconfig-lenet5-adamw": RUN,
    "make menuconfig": INTERACTIVE,
    "make": TRAINS,
    "make EPOCHS=3 LR=0.01 SEED=2": TRAINS,
    'make SET="OPT_BETA2=0.99 PRUNING_SCOPE_LAYER=y"': TRAINS,
    "make savedefconfig": RUN,
    "make olddefconfig": RUN,
    "make continue": RUN,
    "make evaluate RUN=results/<run> DATASET=mnist DATA_DIR=/data": NEEDS_RUN,
    "make evaluate RUN=results/<run>": NEEDS_RUN,
    "make defconfig DEFCONFIG=lenet5-compare": RUN,
    "make dry-run": RUN,
    "make JOBS=2": TRAINS,
    "make status": RUN,
    "make summary": "rewrites the newest matrix's summary under results/; tests/test_summary.py builds one",
    "make update-graphs": "draws the newest matrix under results/; tests/test_graphs.py draws one",
    'echo "not a checkpoint" > /tmp/docs/corrupt/best.pt': RUN,
    "make evaluate RUN=/tmp/docs/corrupt": RUN,
    "make evaluate RUN=/tmp/docs/nothing": RUN,
    "make TRACKER=trackio": TRAINS,
    "make TRACKER=trackio,wandb": TRAINS,
    "make defconfig DEFCONFIG=lenet5 TRACKER=wandb": RUN,
    "make trackio-view": INTERACTIVE,
    "python -m adamwprune.report.tracking view [--project NAME | --model MODEL] [--dir DIR] [--no-browser]":
        "a synopsis, not a command",
    "make trackio-test": "logs a fake run into results/; tests/test_tracking.py runs the script",
    "make wandb-test": "logs a fake run into results/; tests/test_tracking.py runs the script",
    "make defconfig DEFCONFIG=gpt2-shakespeare-tiny CONFIG=/tmp/docs/gpt2tiny.config": RUN,
    "make prepare-data CONFIG=/tmp/docs/gpt2tiny.config DATA_DIR=/tmp/docs-data": DATA,
    ".venv/bin/pip install -e '.[fineweb]'": "installs a package from the registry",
    "make defconfig DEFCONFIG=gpt2-finewebedu-adamwprune": RUN,
    "make prepare-data": "streams FineWeb-Edu from the internet",
    "make MAX_ITERS=2000": TRAINS,
    "make defconfig DEFCONFIG=gpt2-shakespeare-tiny && make": TRAINS,
    "make defconfig DEFCONFIG=gpt2-finewebedu-a10gx4 && make": GPU,
    "make NPROC=8": GPU,
    'TORCHRUN_ARGS="--nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=host0:29500" make NPROC=8':
        "needs two machines",
    "make defconfig DEFCONFIG=gpt2-finewebedu && make": GPU,
    "make defconfig DEFCONFIG=gpt2-finewebedu-adamwprune && make": GPU,
    "make defconfig DEFCONFIG=gpt2-bitter-lesson && make JOBS=<GPUs> && make summary && make update-graphs": GPU,
    "python scripts/gpu_throughput.py --cases gpt2-adamw,gpt2-adamwprune": GPU,
    'make CONFIG=/tmp/docs/gpt2tiny.config DATA_DIR=/tmp/docs-data SET="RUN_RESULTS_DIR=/tmp/docs-results/full"':
        TRAINS,
    'make defconfig DEFCONFIG=lenet5-adamw SET="OPTIMIZER_ADAMWPRUNE=y"': RUN,
    "make export RUN=results/<run>": NEEDS_RUN,
    "make CONFIG=/tmp/sig/.config MAX_ITERS=2000      # a LeNet-5 run; `kill -TERM <its python>` after 8 s":
        "trains and is killed by hand; tests/test_signals.py stops runs with each signal",
    'eval "$(scripts/slurm-local.sh start)"': SLURM,
    "scripts/slurm-local.sh stop": SLURM,
    "make defconfig DEFCONFIG=lenet5-compare && make LAUNCHER=slurm DATASET=synthetic MAX_ITERS=40": SLURM,
    'make CONFIG=/tmp/docs-slurm/m.config LAUNCHER=slurm EPOCHS=2 SET="RUN_RESULTS_DIR=/tmp/docs-slurm/results SLURM_TIME_MIN=30"':
        SLURM,
    "make status DIR=/tmp/docs-slurm/results/20261204-202126_lenet5-compare": SLURM,
    "make defconfig DEFCONFIG=lenet5-compare CONFIG=/tmp/docs-slurm/m.config \\": SLURM,
    "make defconfig DEFCONFIG=gpt2-shakespeare-tiny": RUN,
    "make bench-inference RUN=results/<run>": NEEDS_RUN,
    "make export RUN=results/<timestamp>_<run>": NEEDS_RUN,
    "make bench-inference RUN=results/<timestamp>_<run>": NEEDS_RUN,
    'make SET="PRUNING_TARGET_SPARSITY=0.9"': TRAINS,
    'make SET="GPT2_INIT_FROM=/path/to/hf-folder GPT2_BLOCK_SIZE=256 OPTIMIZER=adamw PRUNING=movement"':
        NEEDS_RUN,
    "make bench": "times the optimizer steps for minutes; tests/test_bench.py runs it on small shapes",
    'make bench BENCH_ARGS="--shapes= --engine-steps=0,0"':
        "times sparse inference for minutes; tests/test_inference_bench.py runs it on small shapes",
    "make defconfig DEFCONFIG=lenet5-lr-grid && make JOBS=2":
        "trains the 40-cell grid (minutes); tests/test_sweep.py tunes from a small one",
    ".venv/bin/python -m adamwprune.data.chars --source /tmp/x/input.txt --out /tmp/x/out \\":
        "tries the network; tests/test_chars.py runs the offline refusal",
    "make defconfig DEFCONFIG=gpt2-shakespeare-char CONFIG=/tmp/i14/full/.config": RUN,
    'make CONFIG=/tmp/i14/full/.config SET="RUN_RESULTS_DIR=/tmp/i14/full/results RUN_THREADS=1"':
        "trains the 2,000-step preset (about 2 min); tests/test_chars.py builds its data and model",
    "git clone https://github.com/karpathy/nanoGPT /path/to/nanoGPT": "needs the internet",
    ".venv/bin/python scripts/compare_nanogpt.py --nanogpt-dir /path/to/nanoGPT [--rounds 3] [--threads 1]":
        "a synopsis over a nanoGPT checkout; tests/test_compare_nanogpt.py runs it on a stand-in",
    "make bench NANOGPT_DIR=/path/to/nanoGPT": "needs a nanoGPT checkout and minutes of timing",
    "make defconfig DEFCONFIG=lenet5-lr-grid SET='MATRIX_SWEEP=\"OPT_LR=0.1,fast\"'": RUN,
    "make defconfig DEFCONFIG=lenet5-compare && make dry-run": RUN,
    "make JOBS=2 && make summary": TRAINS,
    "make defconfig DEFCONFIG=gpt2-char-bitter-lesson CONFIG=/tmp/i14/size2.config SET='MATRIX_TUNED_FROM=\"\" "
    "MATRIX_OPTIMIZER_ADAMWSPAM=n MATRIX_PRUNING_MAGNITUDE=n MATRIX_SPARSITY_50=n MATRIX_VARIANT_BITTER0=n "
    "MATRIX_VARIANT_BITTER1=n MATRIX_SEEDS=1'": RUN,
    'time make CONFIG=/tmp/i14/size2.config JOBS=2 SET="RUN_RESULTS_DIR=/tmp/i14/size2"':
        "times 3 GPT cells for minutes (the sizing measurement it reports)",
    "make dry-run EPOCHS=0": RUN,
    'make dry-run SET="OPT_MOMENTUM=0.8"': RUN,
    "make dry-run LR=abc": RUN,
    'make dry-run SET="NO_SUCH=1"': RUN,
    'make dry-run SET="PRUNING_TARGET_SPARSITY=1.5"': RUN,
    "make dry-run DEVICE=tpu": RUN,
    'make dry-run BATCH_SIZE=63 SET="TRAIN_GRAD_ACCUM=2"': RUN,
    "make defconfig DEFCONFIG=nosuch": RUN,
    "make RUN_RESULTS_DIR=/tmp/x": RUN,
    "cd lenet5 && ../.venv/bin/python train.py --optimizer adamw --pruning-method magnitude "
    "--target-sparsity 0.7 --epochs 3": TRAINS,
    "make defconfig DEFCONFIG=lenet5-magnitude": RUN,
    "make EPOCHS=3 SEED=2": TRAINS,
    "cd lenet5 && ../.venv/bin/python train.py --optimizer adamw --pruning-method movement "
    "--target-sparsity 0.9 --epochs 5": TRAINS,
    ".venv/bin/python -m adamwprune.config.cli --config /tmp/presets2.<preset> defconfig <preset>":
        "a template over every preset (<preset>)",
    ".venv/bin/python -m adamwprune run --config /tmp/presets2.<preset> --override RUN_RESULTS_DIR=/tmp/presets2":
        TRAINS,
    "make defconfig DEFCONFIG=resnet18-adamwprune": RUN,
    "make DATA_DIR=/path/to/cifar": NEEDS_RUN,
    "make defconfig DEFCONFIG=resnet18-state-pruning-compare": RUN,
    "make JOBS=4 DATA_DIR=/path/to/cifar": NEEDS_RUN,
    "make summary && make update-graphs": "needs a finished matrix; tests/test_summary.py and test_graphs.py",
    "cd resnet18 && ../.venv/bin/python train.py --optimizer adamwprune --pruning-method state "
    "--target-sparsity 0.7 --data-dir /path/to/cifar": NEEDS_RUN,
    "python scripts/gpu_throughput.py --cases resnet18-sgd,resnet18-adamwprune,resnet18-adamwprune-compile": GPU,
    "make defconfig DEFCONFIG=resnet18-adamwprune CONFIG=/tmp/docs/r18.config": RUN,
    'make CONFIG=/tmp/docs/r18.config DATASET=synthetic DEVICE=cpu MAX_ITERS=2 BATCH_SIZE=16 '
    'SET="DATA_SYNTHETIC_SIZE=32 RUN_RESULTS_DIR=/tmp/docs-results/smoke"': TRAINS,
    "make defconfig DEFCONFIG=resnet50-adamwprune": RUN,
    "make defconfig DEFCONFIG=resnet50-adamwspam-vs-adamwprune": RUN,
    "make JOBS=<GPUs> DATA_DIR=/path/to/cifar && make summary && make update-graphs": GPU,
    'make SET="RESNET50_STEM_IMAGENET=y" ...': "an elided command line (...)",
    "python scripts/gpu_throughput.py --cases resnet50-sgd,resnet50-adamwprune": GPU,
    "make defconfig DEFCONFIG=resnet50-adamwprune CONFIG=/tmp/docs/r50.config": RUN,
    'make CONFIG=/tmp/docs/r50.config DATASET=synthetic DEVICE=cpu MAX_ITERS=2 BATCH_SIZE=8 '
    'SET="DATA_SYNTHETIC_SIZE=16 RUN_RESULTS_DIR=/tmp/docs-results/smoke"': TRAINS,
    "make defconfig DEFCONFIG=gpt2-bitter-lesson && make dry-run": RUN,
    "make status DIR=/tmp/docs-results/20261125-125133_lenet5-compare": EXAMPLE_MATRIX,
    "make continue DIR=/tmp/docs-results/20261125-125133_lenet5-compare": EXAMPLE_MATRIX,
    'make defconfig DEFCONFIG=lenet5-compare CONFIG=/tmp/docs/m.config SET="MATRIX_OPTIMIZER_SGD=n '
    'MATRIX_OPTIMIZER_ADAM=n MATRIX_OPTIMIZER_ADAMWADV=n MATRIX_OPTIMIZER_ADAMWSPAM=n MATRIX_SPARSITY_50=n '
    'MATRIX_SPARSITY_90=n"': RUN,
    'make CONFIG=/tmp/docs/m.config EPOCHS=3 JOBS=2 SET="RUN_RESULTS_DIR=/tmp/docs-results2"': TRAINS,
}
# Make-line variables the test adds so that nothing is written in the checkout.
ISOLATED = ("status", "continue", "dry-run")


# ------------------------------------------------------------------ parsing
def _blocks(path):
    """(language, lines) of every fenced block."""
    out, lang, lines = [], None, []
    for line in path.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and lang is None:
            lang, lines = fence.group(1), []
        elif fence and lang is not None:
            out.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


def _shell_commands(lines):
    commands, current = [], ""
    for line in lines:
        text = line.strip()
        if not text or (text.startswith("#") and not current):
            continue
        if text.endswith("\\"):
            current += text[:-1].strip() + " "
            continue
        commands.append(re.sub(r"\s+#\s.*$", "", current + text).strip())
        current = ""
    return commands


def doc_commands(path):
    """[(command, shown output lines)] of one page, in order."""
    out = []
    for lang, lines in _blocks(path):
        if lang in ("bash", "sh", "shell"):
            out += [(c, []) for c in _shell_commands(lines)]
            continue
        shown = None  # output lines of the last `$ ` command of an untyped block
        for line in lines:
            if line.startswith("$ "):
                shown = []
                out.append((line[2:].strip(), shown))
            elif shown is not None and line.strip():
                shown.append(line.rstrip())
    return out


def all_commands():
    return [(path, cmd, shown) for path in DOCS for cmd, shown in doc_commands(path)]


def test_every_doc_command_is_classified():
    unknown = sorted({cmd for _, cmd, _ in all_commands()} - set(COMMANDS))
    assert unknown == [], "add these doc commands to COMMANDS (RUN, or why they are skipped)"


def test_the_docs_do_not_link_outside_the_checkout():
    for path in DOCS:
        links = re.findall(r"\]\(([^)]*)\)", path.read_text())
        assert not [l for l in links if l.startswith("../shared") or "/shared/" in l], path.name


# ---------------------------------------------------------------- running
MODULES = {"adamwprune": "adamwprune.cli"}


def _expand(make_args, sandbox):
    """The command lines `make -n` prints for these arguments: (exit status, lines, stderr)."""
    r = subprocess.run(["make", "--no-print-directory", "-n", *make_args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    text = r.stdout.replace("\\\n", " ")  # a recipe line continued with a backslash
    return r.returncode, [l for l in text.splitlines() if l.strip()], r.stderr


def _execute(line, sandbox):
    """One command line make would run: our Python modules in this process (cwd = sandbox)."""
    argv = shlex.split(line)
    argv = argv[1:] if argv[:1] == ["exec"] else argv
    if len(argv) > 2 and argv[0].endswith("bin/python") and argv[1] == "-m":
        module = importlib.import_module(MODULES.get(argv[2], argv[2]))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(sandbox):
            try:
                code = module.main(argv[3:])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (print(exc.code, file=err) or 1)
        return code or 0, out.getvalue(), err.getvalue()
    if "pip install" in line or "-m venv" in line:
        return 0, "", ""
    r = subprocess.run(line, shell=True, cwd=sandbox, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def run_doc_command(command, sandbox):
    """Run a doc command as a user would, redirected into `sandbox`: (exit status, output)."""
    command = command.replace("/tmp/docs", str(sandbox / "docs"))
    code, output = 0, ""
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[0] != "make":
            (sandbox / "docs" / "corrupt").mkdir(parents=True, exist_ok=True)
            r = subprocess.run(part, shell=True, cwd=sandbox, capture_output=True, text=True)
            code, output = r.returncode, output + r.stdout + r.stderr
            continue
        args = words[1:]
        if not any(a.startswith("CONFIG=") for a in args):
            args.append(f"CONFIG={sandbox / '.config'}")
        if args and args[0] in ISOLATED and not any(a.startswith(("DIR=", "SET=")) for a in args):
            args.append(f"SET=RUN_RESULTS_DIR={sandbox / 'results'}")
        code, lines, err = _expand(args, sandbox)
        output += err
        for line in lines if code == 0 else []:
            code, out, err = _execute(line.lstrip("@"), sandbox)
            output += out + err
            if code:
                break
        if code:
            break
    # Paths as the docs show them: /tmp/docs/..., and files of the checkout relative to it.
    return code, output.replace(str(sandbox / "docs"), "/tmp/docs").replace(f"{sandbox}/", "")


def _cases():
    return [pytest.param(path, [(c, s) for c, s in doc_commands(path) if COMMANDS.get(c) == RUN],
                         id=path.name) for path in DOCS
            if any(COMMANDS.get(c) == RUN for c, _ in doc_commands(path))]


@pytest.mark.parametrize("path,commands", _cases())
def test_doc_commands_work_as_written(path, commands, tmp_path):
    """Each page's commands in order, in one scratch directory; an error example (its shown
    output starts with `error:`) must fail, the others succeed, and shown lines appear."""
    for command, shown in commands:
        code, output = run_doc_command(command, tmp_path)
        expects_error = any(l.startswith(("error:", "Makefile:")) for l in shown)
        assert (code != 0) == expects_error, f"{path.name}: `{command}` exited {code}:\n{output[-2000:]}"
        for line in shown:
            if "..." in line:
                continue  # elided in the docs
            assert line.strip() in output, f"{path.name}: `{command}` did not print:\n{line}\n---\n{output[-2000:]}"
