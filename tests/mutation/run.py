"""Plant privacy-plumbing bugs in a copy of the repository and see which tests catch them.

    .venv/bin/python tests/mutation/run.py              # every mutant, markdown table on stdout
    .venv/bin/python tests/mutation/run.py --list       # the mutants
    .venv/bin/python tests/mutation/run.py --only sampler-q secure-std-entry
    .venv/bin/python tests/mutation/run.py --rev HEAD   # a commit, not the working tree

Not part of the test suite (pytest collects test_*.py only, and tests/mutation/conftest.py
ignores this folder): it runs pytest itself. The working tree is copied to a temporary
directory (without .venv, .git, caches; with the built vaultkern/_C*.so), each mutant's
textual edits are applied there, the mutant's pytest selection runs with this
interpreter, and the files are restored before the next mutant. The copy is imported in
preference to the editable install (checked before anything runs), and an unmutated
baseline run of all selections must pass first, so "caught" means caught by a planted
bug and not by a test that was failing anyway.

An edit whose pattern is not found is reported as "not applied" (the code it targets has
moved), never as caught. Each mutant lists candidate files; the first that exists and
matches is edited (the training loop lives in vaultkern/train.py or vaultkern/run/).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
TRAIN_FILES = ("vaultkern/run/loop.py", "vaultkern/train.py")


@dataclass
class Edit:
    paths: Tuple[str, ...]      # candidate files, first match wins
    pattern: str                # regular expression (re.M), must match exactly once
    replacement: str            # re.sub replacement


@dataclass
class Mutant:
    name: str
    description: str
    edits: List[Edit]
    selection: List[str]        # pytest arguments: files or node ids


ENGINE_TESTS = ["tests/test_plumbing_engine.py", "tests/test_privacy_engine.py"]
NOISE_TESTS = ["tests/test_plumbing_noise.py", "tests/test_dp_optimizer.py"]

# Every front door accounts through the one DP assembly's step hook, so the engine's and the
# reference run's "accounts the wrong q" are the same line: each is run against its own tests.
ACCOUNTS_ONE_OVER_STEPS = Edit(
    ("vaultkern/privacy/assembly.py",),
    r"run\.accountant\.step\(optimizer\.noise_multiplier, run\.sample_rate,",
    "run.accountant.step(optimizer.noise_multiplier, "
    "1.0 / -(-run.dataset_size // int(run.expected_batch_size)),")

MUTANTS = [
    Mutant("sampler-q", "Poisson loader samples at q = 1/len(loader) instead of B̄/N",
           [Edit(("vaultkern/privacy/sampling.py",),
                 r'sample_rate = expected \* getattr\(sampler, "world_size", 1\) / num_samples$',
                 "sample_rate = 1.0 / len(data_loader)")],
           ["tests/test_sampling.py", *ENGINE_TESTS]),
    Mutant("assembly-q", "the DP assembly samples and accounts q = 1/(batches per pass), not B̄/N",
           [Edit(("vaultkern/privacy/assembly.py",),
                 r"q = float\(expected_batch_size\) / dataset_size if poisson_sampling",
                 "q = 1.0 / -(-dataset_size // int(expected_batch_size)) if poisson_sampling")],
           [*ENGINE_TESTS, "tests/test_plumbing_train.py"]),
    Mutant("engine-accounts-q", "engine accounts q = 1/len(loader) (samples B̄/N)",
           [ACCOUNTS_ONE_OVER_STEPS], ENGINE_TESTS),
    Mutant("engine-calibrates-q", "make_private_with_epsilon calibrates σ for q = 1/len(loader)",
           [Edit(("vaultkern/privacy/engine.py",),
                 r"sample_rate = expected_batch_size_of\(data_loader\) \* world_size\(\) / "
                 r"len\(data_loader\.dataset\)$",
                 "sample_rate = 1.0 / len(data_loader)")],
           ENGINE_TESTS),
    Mutant("engine-truncated-as-poisson", "engine accounts truncated Poisson as plain Poisson",
           [Edit(("vaultkern/privacy/assembly.py",),
                 r"step_kwargs = \(\{\} if truncated_max_batch is None else",
                 "step_kwargs = ({} if True else")],
           ENGINE_TESTS),
    Mutant("train-shuffled-batches",
           "reference run trains on shuffled fixed-size batches, still accounts Poisson",
           [Edit(TRAIN_FILES,
                 r"^(\s*)self\.stepper, self\.sampler, self\.accountant = run\.optimizer.*\n",
                 r"\g<0>\1self.sampler = ShuffledBatches(len(self.rows), args.batch_size, "
                 r"plan.steps, args.seed)\n")],
           ["tests/test_plumbing_train.py"]),
    Mutant("train-accounts-q", "reference run accounts q = 1/(steps per epoch) instead of B̄/N",
           [ACCOUNTS_ONE_OVER_STEPS], ["tests/test_plumbing_train.py"]),
    Mutant("update-realised-batch",
           "update (clipped sum + noise) divided by the realised batch size, not B̄",
           [Edit(("vaultkern/core/bookkeeping.py",),
                 r"^(\s*)(batch|rows) = self\._check_layout\(groups\)\n",
                 r"\g<0>\1import vaultkern.privacy.optimizer as _vk_opt\n"
                 r"\1_vk_opt.REALISED_ROWS = \2\n"),
            Edit(("vaultkern/privacy/optimizer.py",),
                 r"std, scale = self\.noise_std, self\.update_scale$",
                 'std, scale = self.noise_std, (1.0 / globals().get("REALISED_ROWS", '
                 'self.expected_batch_size) if self.loss_reduction == "mean" else 1.0)')],
           [*ENGINE_TESTS, "tests/test_dp_optimizer.py"]),
    Mutant("secure-std-entry", "secure_noisy_scale noise std x1.05",
           [Edit(("vaultkern/ops/noise.py",), r"^(def secure_noisy_scale\([^)]*\)[^:]*:\n)",
                 r"\1    std = 1.05 * std\n")],
           NOISE_TESTS),
    Mutant("secure-std-optimizer", "DPOptimizer secure_mode noise std x1.05",
           [Edit(("vaultkern/privacy/optimizer.py",), r"secure_noisy_scale\(g, std, scale\)",
                 "secure_noisy_scale(g, 1.05 * std, scale)")],
           NOISE_TESTS),
    Mutant("reproducible-std", "DPOptimizer reproducible-mode noise std x1.02",
           [Edit(("vaultkern/privacy/optimizer.py",),
                 r"std, scale = self\.noise_std, self\.update_scale$",
                 "std, scale = 1.02 * self.noise_std, self.update_scale")],
           ["tests/test_dp_optimizer.py", "tests/test_plumbing_engine.py"]),
    Mutant("fsdp-shard-offset", "FSDP2: every shard noised from counter 0 of its parameter "
           "(the ranks' noise overlaps, not the single-process draw)",
           [Edit(("vaultkern/privacy/optimizer.py",), r"offsets\.append\(offset \+ start\)",
                 "offsets.append(offset)")],
           ["tests/test_distributed.py::test_fsdp2_step_equals_one_process_on_the_whole_batch"]),
    Mutant("fsdp-unreduced", "FSDP2: each rank keeps its own slice of its local clipped sum "
           "(no sum over ranks)",
           [Edit(("vaultkern/core/sharded.py",),
                 r"_reduce_scatter\(shard, padded, group=fp\.mesh_info\.shard_process_group\)",
                 "shard.copy_(padded.chunk(world)[fp.mesh_info.shard_mesh_rank])")],
           ["tests/test_distributed.py::test_fsdp2_on_a_transformers_llama_and_an_empty_shard"]),
    Mutant("clip-without-min", "clip factor C/‖g‖ without min(1, ·)",
           [Edit(("vaultkern/core/clipping.py",),
                 r"\(threshold / \(norms \+ CLIP_EPS\)\)\.clamp\(max=1\.0\)",
                 "(threshold / (norms + CLIP_EPS))")],
           ["tests/test_plumbing_clip.py", "tests/test_plumbing_engine.py"]),
]


def copy_tree(dest: Path, rev: str = None) -> None:
    """The working tree, or (``rev``) a committed tree plus the working tree's built _C."""
    if rev is None:
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "runs",
                                        "build", "*.egg-info", ".whl")
        shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
        return
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for built in (REPO / "vaultkern").glob("_C*.so"):
        shutil.copy2(built, dest / "vaultkern" / built.name)


def environment(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale .pyc between a mutant and its restore
    # the copy first on the path of every process, also those the tests start themselves
    # (distributed workers, torchrun): a script's own folder, not the cwd, leads sys.path
    env["PYTHONPATH"] = str(root)
    return env


def check_copy_is_imported(root: Path) -> None:
    # from another folder, as a test's own subprocess would import it
    out = subprocess.run([sys.executable, "-c", "import vaultkern; print(vaultkern.__file__)"],
                         cwd=root / "tests", env=environment(root), capture_output=True,
                         text=True, check=True)
    path = Path(out.stdout.strip()).resolve()
    if root.resolve() not in path.parents:
        sys.exit(f"the copy is not what gets imported ({path}); aborting")


def run_pytest(root: Path, selection: Sequence[str], timeout: int) -> Tuple[int, List[str], str]:
    """(return code, failing test ids, output tail)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *selection]
    try:
        proc = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], "timed out"
    output = proc.stdout + proc.stderr
    failed = [m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", output, re.M)]
    return proc.returncode, failed, output[-3000:]


def apply(root: Path, mutant: Mutant) -> Tuple[dict, str]:
    """Apply the edits; (original texts by path, problem or '')."""
    originals: dict = {}
    for edit in mutant.edits:
        for rel in edit.paths:
            path = root / rel
            if not path.exists():
                continue
            text = path.read_text()
            new, count = re.subn(edit.pattern, edit.replacement, text, flags=re.M)
            if count == 0:
                continue
            if count > 1:
                return originals, f"pattern matches {count} times in {rel}"
            originals.setdefault(path, text)
            path.write_text(new)
            break
        else:
            return originals, f"pattern not found: {edit.pattern!r} in {', '.join(edit.paths)}"
    return originals, ""


def restore(originals: dict) -> None:
    for path, text in originals.items():
        path.write_text(text)


def short(test_id: str) -> str:
    return test_id.replace("tests/", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--rev", default=None,
                        help="test this commit (git archive) instead of the working tree, e.g. "
                             "HEAD while others have half-finished edits in the checkout")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list or not mutants:
        for m in MUTANTS:
            print(f"{m.name:30} {m.description}  [{' '.join(m.selection)}]")
        return 0 if args.list else 2

    tmp = Path(tempfile.mkdtemp(prefix="vk-mutation-"))
    root = tmp / "repo"
    try:
        copy_tree(root, args.rev)
        check_copy_is_imported(root)
        selections = sorted({s for m in mutants for s in m.selection})
        start = time.time()
        rc, failed, tail = run_pytest(root, selections, args.timeout)
        print(f"baseline ({' '.join(selections)}): rc={rc}, {time.time() - start:.0f} s",
              file=sys.stderr)
        if rc != 0:
            print(tail, file=sys.stderr)
            sys.exit("the unmutated copy fails its selection: fix that first; no table")

        rows, missed = [], 0
        for m in mutants:
            originals, problem = apply(root, m)
            start = time.time()
            if problem:
                verdict, by = "NOT APPLIED", problem
            else:
                rc, failed, tail = run_pytest(root, m.selection, args.timeout)
                if rc == 1 and failed:
                    verdict, by = "caught", ", ".join(short(t) for t in failed)
                elif rc == 0:
                    verdict, by = "MISSED", ""
                else:  # collection error, crash, timeout: not a meaningful catch
                    verdict, by = f"ERROR (rc={rc})", tail.strip().splitlines()[-1] if tail else ""
            restore(originals)
            missed += verdict != "caught"
            rows.append((m, verdict, by, time.time() - start))
            print(f"{m.name}: {verdict} ({time.time() - start:.0f} s)", file=sys.stderr)
    finally:
        if args.keep:
            print(f"copy kept at {root}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("| planted bug | result | caught by (failing tests) | s |")
    print("|---|---|---|---|")
    for m, verdict, by, seconds in rows:
        print(f"| `{m.name}`: {m.description} | {verdict} | {by} | {seconds:.0f} |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
