"""Mutation check: does the test suite catch realistic one-line bugs in the core paths?

Each entry of ``MUTATIONS`` is a one-line bug (a collective dropped or put on the wrong group, an offset lost, a
factor missing) in one file, with the few fast tests that should fail because of it. The working tree (tracked
files and untracked files git does not ignore) is copied once to a temporary snapshot, with ``.venv`` and
``artifacts`` symlinked from this checkout so nothing is rebuilt; every selected mutation gets a fresh copy of that
snapshot, is applied there and its tests run there:

    .venv/bin/python -m pytest -q -x -p no:cacheprovider <node ids>      (cwd = the copy)

Exit status 1 (a test failed) is "caught", 0 is "survived", anything else (collection error, timeout) is "error".
First the union of the selected mutations' tests runs once on an unmutated copy (the baseline): a mutation
counts as caught only when its tests pass without it.

The copy's own code must be what the tests import, also in ranks that the tests fork or launch: the project is
installed editable into .venv (a finder that maps ``train``, ``model``, ``data``, ``launch`` to this checkout),
so every pytest process gets PYTHONPATH=<copy>, which path-based imports consult before that finder, and each
copy is checked to resolve those packages to itself (from its own directory and from an unrelated one, as a rank
launched elsewhere would) before any test runs.

Usage (from the repository root, after ``make data``):

    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py                       # all mutations, baseline first
    .venv/bin/python scripts/mutation_check.py --only moe-lb-no-E mamba-chunk-carry --out runs/mutations.md
    .venv/bin/python scripts/mutation_check.py --only tp-mamba-norm-world --tests <node id> ...   # try other tests

Exit status: 0 when the baseline passed and every selected mutation was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINKED = (".venv", "artifacts")  # shared with the copies, not copied: the environment and the prepared data
PACKAGES = ("train", "model", "data", "launch")
PYTEST = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")
TAIL_LINES = 40  # of a failed baseline's or an erroring run's output, printed


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str  # one line at most; "" deletes the original (which is then a whole line's code)
    description: str
    tests: tuple[str, ...]  # pytest node ids that should fail with the mutation applied
    default: bool = True  # False: run only when named with --only


TP_LAYERS = "tests/test_parallel_tp_layers.py::test_tensor_parallel_matches_single_device"
CP = "tests/test_parallel_cp.py::test_context_parallel_matches_single_process"
DECAY_GROUPS = "tests/test_param_groups.py::test_decayed_parameters_are_exactly_the_listed_ones"
NAN = "tests/test_numerics.py::test_nonfinite_step_is_skipped_on_every_rank"

MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------------------- tensor parallelism (collectives)
    Mutation(
        "tp-experts-no-allreduce", "train/parallel/tp.py",
        "return reduce_from_tensor_model_parallel_region(out.contiguous(), group=self.tp_group)",
        "return out.contiguous()",
        "TP experts: each rank's partial expert output is not all-reduced over the TP group",
        (f"{TP_LAYERS}[moe-tp]",),
    ),
    Mutation(
        "tp-input-grad-no-allreduce", "train/parallel/tp.py",
        "return (copy_to_tp(args[0], tp.group), *args[1:])",
        "return args",
        "TP without SP: the column-parallel layers' partial input gradients are not all-reduced in backward",
        (f"{TP_LAYERS}[dense-tp]",),
    ),
    Mutation(
        "tp-mamba-norm-world", "train/parallel/tp.py",
        "return copy_to_tp(out, tp.group)",
        "return copy_to_tp(out, None)",
        "TP Mamba: the dt/B/C norm outputs' gradients are all-reduced over the whole world, not the TP group "
        "(identical at 2 ranks: needs a layout with more ranks than tp)",
        ("tests/test_parallel_3d.py::test_layout_matches_single_process[hybrid-tp2-ep2-zero2]",),
    ),
    # ---------------------------------------------------------------------------- sequence parallelism
    Mutation(
        "sp-gather-rank-major", "train/parallel/sp.py",
        "return out.view(size, *x.shape).transpose(0, 1).reshape(x.shape[0], size * x.shape[1], *x.shape[2:])",
        "return out.reshape(x.shape[0], size * x.shape[1], *x.shape[2:])",
        "SP all-gather along T: the rank-major buffer reshaped without the transpose (rows mixed when batch > 1)",
        (f"{TP_LAYERS}[dense-sp]",),
    ),
    Mutation(
        "sp-norm-grad-not-reduced", "train/parallel/tp.py",
        "p.register_hook(functools.partial(all_reduce_copy, group=tp.group))",
        "",
        "SP: the norm weights' gradients (from T/tp rows each) are not summed over the TP group",
        (f"{TP_LAYERS}[dense-sp]",),
    ),
    # ---------------------------------------------------------------------------- context parallelism
    Mutation(
        "cp-rope-offset", "train/parallel/cp.py",
        "return base(seq_len, device, start=start + cp_rank * seq_len)",
        "return base(seq_len, device, start=start)",
        "CP: RoPE positions restart at 0 on every rank instead of at the rank's global offset",
        (f"{CP}[dense-cp2]",),
    ),
    Mutation(
        "cp-mamba-conv-tail", "train/parallel/cp.py",
        "tail = x[:, x.shape[1] - (self.d_conv - 1):]",
        "tail = x[:, : self.d_conv - 1]",
        "CP Mamba: the next rank gets this part's first d_conv - 1 conv inputs instead of its last ones",
        (f"{CP}[hybrid-cp2]",),
    ),
    Mutation(
        "cp-mamba-state-dropped", "train/parallel/cp.py",
        "chunk_size=self.chunk_size, initial_state=h0, return_final_state=True,",
        "chunk_size=self.chunk_size, initial_state=None, return_final_state=True,",
        "CP Mamba: the SSM state received from the previous rank is not used (each part scans from zero); the "
        "state's gradient is then never sent back and the ranks hang until the layout check's 180 s timeout",
        (f"{CP}[hybrid-cp2]",),
    ),
    Mutation(
        "cp-moe-stats-local", "train/parallel/cp.py",
        "both = Collective.apply(torch.cat((load, mean_probs)), self.cp_group, _all_reduce_mean, identity)",
        "both = torch.cat((load, mean_probs))",
        "CP MoE: the load-balancing statistics are this rank's part's, not averaged over the CP group",
        (f"{CP}[moe-cp2]",),
    ),
    # ---------------------------------------------------------------------------- gradient norm
    Mutation(
        "grad-norm-tp-not-summed", "train/parallel/grad.py",
        "tp_summed = _reduce(sq[[1, 3]].clone(), groups.tp_group, lay.tp)",
        "tp_summed = sq[[1, 3]].clone()",
        "grad norm: the TP shards' squares are not summed over the TP group (each rank clips by its own part)",
        ("tests/test_parallel_tp.py::test_tp2_other_zero_stages_match_single_process[0]",),
    ),
    Mutation(
        "grad-norm-expert-not-summed", "train/parallel/grad.py",
        "expert = _reduce(torch.stack([sq[2], tp_summed[1]]), groups.ep_group, lay.ep)",
        "expert = torch.stack([sq[2], tp_summed[1]])",
        "grad norm: the expert shards' squares are not summed over the EP group (other ranks' experts missing)",
        ("tests/test_parallel_ep.py::test_ep2_trainer_matches_one_process[moe_tiny-0-True]",),
    ),
    # ---------------------------------------------------------------------------- MoE auxiliary losses
    Mutation(
        "moe-lb-no-E", "model/moe.py",
        "lb_loss = self.num_experts * (load * mean_probs).sum()",
        "lb_loss = (load * mean_probs).sum()",
        "MoE: the load-balancing loss misses the factor E (num_experts)",
        ("tests/test_moe.py::test_load_balancing_and_z_loss_hand_computed",),
    ),
    Mutation(
        "moe-z-not-squared", "model/moe.py",
        "z_loss = torch.logsumexp(logits, dim=-1).square().mean()",
        "z_loss = torch.logsumexp(logits, dim=-1).mean()",
        "MoE: the router z-loss averages logsumexp instead of its square",
        ("tests/test_moe.py::test_load_balancing_and_z_loss_hand_computed",),
    ),
    # ---------------------------------------------------------------------------- Mamba scan state
    Mutation(
        "mamba-chunk-carry", "model/mamba.py",
        "entering[k] = h_k[:, -1]",
        "entering[k] = entering[k - 1]",
        "chunked scan: a chunk starts from the previous chunk's entering state, not from its final state",
        ("tests/test_mamba.py::test_chunked_scan_matches_reference_forward_and_backward[16-100]",),
    ),
    Mutation(
        "mamba-bwd-carry-decay", "model/mamba.py",
        "carry = a_steps[0] * g_steps[0]",
        "carry = g_steps[0]",
        "chunked scan backward: the gradient passed to the previous chunk misses the first step's decay",
        ("tests/test_mamba.py::test_chunked_scan_matches_reference_forward_and_backward[16-100]",),
    ),
    Mutation(
        "mamba-final-state-wrong", "model/mamba.py",
        "h_last = h_k[:, -1].clone() if h_k is not None else entering[0].clone()",
        "h_last = entering[-1].clone()",
        "chunked scan: the returned final state is the state entering the last chunk, not the one after it",
        ("tests/test_mamba.py::test_scan_split_in_two_with_state_hand_off_equals_one_scan[chunked]",),
    ),
    Mutation(
        "mamba-initial-state-ignored", "model/mamba.py",
        "h0 = None if initial_state is None else initial_state.float().transpose(1, 2).contiguous()",
        "h0 = None",
        "chunked scan: initial_state is ignored (a continued sequence restarts from zero)",
        ("tests/test_mamba.py::test_scan_split_in_two_with_state_hand_off_equals_one_scan[chunked]",),
    ),
    # ---------------------------------------------------------------------------- data resume
    Mutation(
        "data-resume-one-early", "data/stream.py",
        'self._next_step = int(sd["next_step"])',
        'self._next_step = int(sd["next_step"]) - 1',
        "data stream: a resumed loader repeats the last batch before the checkpoint",
        ("tests/test_data_stream.py::test_resume_continues_exactly_even_at_another_dp_size",),
    ),
    Mutation(
        "data-state-one-late", "data/stream.py",
        '"next_step": self._next_step, "seed": self.seed',
        '"next_step": self._next_step + 1, "seed": self.seed',
        "data stream: the saved state points one batch past the next one (a batch is skipped on resume)",
        ("tests/test_data_stream.py::test_resume_continues_exactly_even_at_another_dp_size",),
    ),
    # ---------------------------------------------------------------------------- checkpoint slices
    Mutation(
        "ckpt-slice-wrong-offset", "train/checkpoint_shards.py",
        "src = tuple(slice(a - so, b - so) for a, b, so in zip(lo, hi, saved.offsets))",
        "src = tuple(slice(a - so, b - so) for a, b, so in zip(lo, hi, shard.offsets))",
        "resharding read: a saved piece is sliced at the requested shard's offsets instead of its own",
        ("tests/test_checkpoint_shards.py::test_deepspeed_roundtrip_across_layouts[tp2-zero1]",),
    ),
    Mutation(
        "shard-offset-wrong-dim", "train/parallel/shard.py",
        "offsets[dim] += index * part",
        "offsets[0] += index * part",
        "shard record: the offset goes to dim 0 whatever the split dim (a row-parallel weight's piece misplaced)",
        ("tests/test_checkpoint_shards.py::test_deepspeed_roundtrip_across_layouts[tp2-zero1]",),
    ),
    # ---------------------------------------------------------------------------- optimizer, numerics, watchdog
    # This section holds the mutations of LR warm-up/decay (train/engine.py lr_multiplier), weight-decay groups
    # (train/engine.py param_groups), the non-finite guard at each layout (train/numerics.py guarded_step) and the
    # watchdog's timing (train/watchdog.py), each with the test that catches it.
    Mutation(
        "lr-cosine-ignores-warmup", "train/engine.py",
        "progress = min(1.0, (step - sched.warmup_steps) / span)",
        "progress = min(1.0, step / span)",
        "LR: cosine decay measured from step 0 instead of from the end of warm-up",
        ("tests/test_schedule.py::test_factor_matches_the_hand_computed_value[cosine_warmup-train.engine]",),
    ),
    Mutation(
        "lr-warmup-off-by-one", "train/engine.py",
        "return (step + 1) / sched.warmup_steps",
        "return step / sched.warmup_steps",
        "LR: warm-up starts at 0 and reaches the full lr one step late",
        ("tests/test_schedule.py::test_warmup_climbs_by_one_over_warmup_per_step_to_the_full_lr[cosine-train.engine]",),
    ),
    Mutation(
        "lr-wsd-decay-late", "train/engine.py",
        "progress = min(1.0, (step - decay_start + 1) / decay_steps)",
        "progress = min(1.0, (step - decay_start) / decay_steps)",
        "LR: wsd's linear decay one step late (the last step does not reach the floor)",
        ("tests/test_schedule.py::test_factor_matches_the_hand_computed_value[wsd-train.engine]",),
    ),
    Mutation(
        "wd-decays-vectors", "train/engine.py",
        '(decay if ndim >= 2 and not name.endswith("A_log") else no_decay).append(p)',
        '(decay if ndim >= 1 and not name.endswith("A_log") else no_decay).append(p)',
        "weight decay: norm gains and biases (1-d) put in the decayed group",
        (f"{DECAY_GROUPS}[dense_tiny-train.engine.param_groups]",),
    ),
    Mutation(
        "nan-guard-off-zero2", "train/numerics.py",
        "            if self.skip_update:",
        "            if False:",
        "non-finite guard: the update of a step with a NaN/Inf gradient or loss is applied (fp32 ZeRO-2)",
        (f"{NAN}[zero2]",),
    ),
    Mutation(
        "nan-guard-off-tp2-zero0", "train/numerics.py",
        "            if self.skip_update:",
        "            if False:",
        "non-finite guard: the update of a step with a NaN/Inf gradient or loss is applied (TP2, ZeRO-0)",
        (f"{NAN}[tp2-zero0]",),
    ),
    Mutation(
        "nan-guard-off-zero3-loss", "train/numerics.py",
        "            if self.skip_update:",
        "            if False:",
        "non-finite guard: the update of a step with a NaN/Inf gradient or loss is applied (ZeRO-3, NaN loss)",
        (f"{NAN}[zero3-loss]",),
    ),
    Mutation(
        "nan-guard-off-pp2", "train/numerics.py",
        "            if self.skip_update:",
        "            if False:",
        "non-finite guard: the update of a step with a NaN/Inf gradient or loss is applied (PP2, ZeRO-1)",
        (f"{NAN}[pp2]",),
    ),
    Mutation(
        "nan-guard-off-ep2", "train/numerics.py",
        "            if self.skip_update:",
        "            if False:",
        "non-finite guard: the update of a step with a NaN/Inf gradient or loss is applied (EP2 MoE, ZeRO-2)",
        (f"{NAN}[ep2]",),
    ),
    Mutation(
        "nan-guard-local-decision", "train/numerics.py",
        "            dist.all_reduce(flags)",
        "            pass",
        "non-finite guard: each rank decides alone (the clean rank steps while the faulty one skips)",
        (f"{NAN}[zero2]",),
    ),
    Mutation(
        "watchdog-fires-late", "train/watchdog.py",
        "if not self.armed or now - self.last_progress <= self.timeout_s:",
        "if not self.armed or now - self.last_progress <= 2 * self.timeout_s:",
        "watchdog: a stall is declared only after twice train.collective_timeout_s",
        ("tests/test_watchdog.py::test_fires_only_once_armed_and_past_the_timeout",),
    ),
    Mutation(
        "watchdog-progress-ignored", "train/watchdog.py",
        "self.step, self.phase, self.last_progress = step, phase, self.clock()",
        "self.step, self.phase = step, phase",
        "watchdog: progress does not restart the timer (a healthy run is killed one timeout after arming)",
        ("tests/test_watchdog.py::test_progress_restarts_the_timer",),
    ),
    Mutation(
        "watchdog-timer-from-startup", "train/watchdog.py",
        "self.last_progress = self.clock()",
        "",
        "watchdog: arming does not restart the timer (a long start-up counts as a stall)",
        ("tests/test_watchdog.py::test_fires_only_once_armed_and_past_the_timeout",),
    ),
    # ---------------------------------------------------------------------------- loss
    Mutation(
        "loss-mean-counts-ignored", "model/loss.py",
        "scale = 1.0 / valid.sum().clamp(min=1).to(torch.float32)",
        "scale = 1.0 / torch.tensor(float(labels.numel()))",
        "fused cross entropy: the mean divides by every position, ignored labels included",
        ("tests/test_loss.py::test_fused_loss_and_gradients_equal_cross_entropy_on_full_logits[8-1.0]",),
    ),
]


@dataclass
class Outcome:
    mutation: Mutation
    tests: tuple[str, ...]
    result: str  # caught | survived | error | baseline-failed
    seconds: float
    detail: str = ""
    log: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ the copy
def tree_files(repo: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore, as they are in the working tree now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return sorted({name for name in out.split("\0") if name})


def make_copy(repo: Path, files: Sequence[str], parent: Path, prefix: str = "mutant-") -> Path:
    copy = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    for name in files:
        if name.split("/", 1)[0] in LINKED:
            continue
        src = repo / name
        if not src.is_symlink() and not src.exists():  # deleted in the working tree, not yet in the index
            continue
        dst = copy / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    for name in LINKED:
        if (repo / name).exists():
            (copy / name).symlink_to(repo / name)
    return copy


def check_mutation(repo: Path, m: Mutation) -> str:
    """The file's text with ``m`` applied; raises ValueError when ``m`` is malformed or does not apply once."""
    if "\n" in m.original or "\n" in m.replacement or not m.original.strip():
        raise ValueError(f"mutation {m.id}: original and replacement must be one line (original non-empty)")
    if m.original == m.replacement:
        raise ValueError(f"mutation {m.id}: the replacement equals the original")
    path = repo / m.file
    if not path.is_file():
        raise ValueError(f"mutation {m.id}: {m.file} does not exist")
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        raise ValueError(f"mutation {m.id}: the original text occurs {count} times in {m.file}, expected exactly once:"
                         f"\n    {m.original}")
    if m.replacement == "":  # a deleted line: the original must be all of its line's code
        start = text.index(m.original)
        line_start, line_end = text.rfind("\n", 0, start) + 1, text.find("\n", start)
        line = text[line_start:line_end if line_end != -1 else len(text)]
        if line.strip() != m.original:
            raise ValueError(f"mutation {m.id}: deleting part of a line; give the whole line's code:\n    {line}")
    return text.replace(m.original, m.replacement)


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VIRTUAL_ENV"):
        env.pop(key, None)
    # Path-based imports come before the editable install's finder (which maps to this checkout): the copy's code
    # in the pytest process, and in every rank started from it, wherever its working directory is.
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(copy: Path, python: Path) -> None:
    """The copy's interpreter finds the project's packages in the copy, from the copy and from elsewhere."""
    code = ("import importlib.util; "
            f"print('\\n'.join(importlib.util.find_spec(p).origin for p in {PACKAGES!r}))")
    for cwd in (copy, Path(tempfile.gettempdir())):
        out = subprocess.run([str(python), "-c", code], cwd=cwd, env=env_for(copy), check=True, capture_output=True,
                             text=True).stdout.split()
        wrong = [origin for origin in out if not Path(origin).resolve().is_relative_to(copy.resolve())]
        if wrong or len(out) != len(PACKAGES):
            raise RuntimeError(f"from {cwd} the copy imports {wrong or out}, not its own packages in {copy}")


def run_pytest(copy: Path, tests: Sequence[str], timeout: float, extra: Sequence[str] = (),
               exitfirst: bool = True) -> tuple[int | None, str]:
    """(pytest's exit status or None on timeout, its output)."""
    python = copy / ".venv" / "bin" / "python"
    options = [o for o in PYTEST if exitfirst or o != "-x"]
    cmd = [str(python), *options, *extra, *tests]
    # A session of its own, so a timed-out run's forked ranks and data workers go with it.
    proc = subprocess.Popen(cmd, cwd=copy, env=env_for(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def classify(code: int | None) -> str:
    return {0: "survived", 1: "caught"}.get(code, "error") if code is not None else "error"


def clone(snapshot: Path, parent: Path) -> Path:
    """A fresh copy of the snapshot (its .venv and artifacts stay symlinks)."""
    copy = Path(tempfile.mkdtemp(prefix="mutant-", dir=parent))
    shutil.copytree(snapshot, copy, symlinks=True, dirs_exist_ok=True)
    return copy


# ------------------------------------------------------------------------------------------ baseline
def junit_outcomes(path: Path) -> dict[str, str]:
    """node id -> passed / failed / skipped, from pytest's JUnit XML (tests outside classes, as this suite's)."""
    outcomes: dict[str, str] = {}
    if not path.exists():
        return outcomes
    for case in ET.parse(path).iter("testcase"):
        parts = case.get("classname", "").split(".")
        # classname is the module's dotted path, plus a class name when the test sits in a class
        module, klass = (parts, []) if not parts[-1][:1].isupper() else (parts[:-1], parts[-1:])
        node = "/".join(module) + ".py::" + "::".join([*klass, case.get("name", "")])
        kinds = {child.tag for child in case}
        outcomes[node] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                          else "passed")
    return outcomes


def baseline_status(test: str, outcomes: dict[str, str]) -> str:
    """passed when every collected test under the node id ``test`` passed (and there was one)."""
    matched = [o for node, o in outcomes.items()
               if node == test or node.startswith((test + "[", test + "::")) or test.endswith(".py")
               and node.startswith(test + "::")]
    if not matched:
        return "not run"
    return "passed" if all(o == "passed" for o in matched) else "failed" if "failed" in matched else "skipped"


# ------------------------------------------------------------------------------------------ report
def markdown_table(outcomes: Sequence[Outcome]) -> str:
    rows = ["| id | file | bug | test | result | s |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        m = o.mutation
        bug = f"`{m.original}` → " + (f"`{m.replacement}`" if m.replacement else "(line deleted)")
        bug = bug.replace("|", "\\|")
        tests = "<br>".join(f"`{t}`" for t in o.tests)
        result = o.result + (f" ({o.detail})" if o.detail else "")
        rows.append(f"| {m.id} | `{m.file}` | {m.description}: {bug} | {tests} | {result} | {o.seconds:.0f} |")
    return "\n".join(rows) + "\n"


def write_log(directory: Path | None, name: str, text: str) -> None:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.log").write_text(text)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    p.add_argument("--tests", nargs="+", metavar="NODE", help="run these node ids instead of the mutations' own")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="run the tests on an unmutated copy first (default: on)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run before it counts as error")
    p.add_argument("--logs", type=Path, help="write each pytest run's output to <this dir>/<id>.log")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the copies go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    by_id = {m.id: m for m in MUTATIONS}
    if len(by_id) != len(MUTATIONS):
        raise SystemExit("mutation ids must be unique")
    unknown = sorted(set(args.only or ()) - set(by_id))
    if unknown:
        raise SystemExit(f"unknown mutation ids {unknown}; --list shows them")
    selected = [by_id[i] for i in args.only] if args.only else [m for m in MUTATIONS if m.default or args.list]
    try:
        for m in selected:
            check_mutation(REPO, m)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.list:
        for m in selected:
            note = "" if m.default else "  (only with --only)"
            print(f"{m.id}{note}\n    {m.file}: {m.description}")
            print(f"    - {m.original}\n    + {m.replacement or '(deleted)'}")
            print("".join(f"    test: {t}\n" for t in (args.tests or m.tests)), end="")
        return 0
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"error: {python} is missing; run `make venv` (or `make data`) first")

    tests_of = {m.id: tuple(args.tests or m.tests) for m in selected}
    started = time.monotonic()
    # One snapshot of the working tree, taken now, for the baseline and every mutant: files others edit while this
    # runs do not make a mutant's tests differ from the baseline's.
    snapshot = make_copy(REPO, tree_files(REPO), args.tmp, prefix="mutation-snapshot-")
    copies: list[Path] = [snapshot]

    def fresh_copy() -> Path:
        copy = clone(snapshot, args.tmp)
        copies.append(copy)
        check_imports_from(copy, python)
        return copy

    try:
        base: dict[str, str] = {}
        baseline_ok = True
        if args.baseline:
            union = list(dict.fromkeys(t for m in selected for t in tests_of[m.id]))
            copy = fresh_copy()
            junit = copy.parent / f"{copy.name}-baseline.xml"
            t0 = time.monotonic()
            print(f"baseline: {len(union)} test node(s) on the unmutated copy {copy}", flush=True)
            # No -x: every test's own baseline outcome is wanted.
            code, out = run_pytest(copy, union, args.timeout * len(union), [f"--junitxml={junit}"], exitfirst=False)
            outcomes = junit_outcomes(junit)
            write_log(args.logs, "baseline", out)
            junit.unlink(missing_ok=True)
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
                copies.remove(copy)
            base = {t: baseline_status(t, outcomes) for t in union}
            bad = {t: s for t, s in base.items() if s != "passed"}
            baseline_ok = code == 0 and not bad
            verdict = "passed" if baseline_ok else f"FAILED (exit {code})"
            print(f"baseline: {verdict}, {time.monotonic() - t0:.0f} s", flush=True)
            for t, s in bad.items():
                print(f"    {s}: {t}")
            if not baseline_ok:
                print(tail(out), flush=True)

        results: list[Outcome] = []
        for i, m in enumerate(selected, start=1):
            tests = tests_of[m.id]
            t0 = time.monotonic()
            not_passing = [t for t in tests if base and base.get(t) != "passed"]
            if not_passing:
                outcome = Outcome(m, tests, "baseline-failed", 0.0, f"{len(not_passing)} test(s) fail unmutated")
            else:
                copy = fresh_copy()
                try:
                    (copy / m.file).write_text(check_mutation(copy, m))
                except ValueError as err:  # the file changed between the check above and the snapshot
                    code, out, result, detail = None, str(err), "error", "does not apply"
                else:
                    code, out = run_pytest(copy, tests, args.timeout)
                    result = classify(code)
                    detail = "timeout" if code is None else f"exit {code}" if result == "error" else ""
                outcome = Outcome(m, tests, result, time.monotonic() - t0, detail, out.splitlines())
                write_log(args.logs, m.id, out)
                if not args.keep:
                    shutil.rmtree(copy, ignore_errors=True)
                    copies.remove(copy)
            results.append(outcome)
            print(f"[{i}/{len(selected)}] {m.id}: {outcome.result}"
                  f"{f' ({outcome.detail})' if outcome.detail else ''}, {outcome.seconds:.0f} s", flush=True)
            if outcome.result == "error":
                print(tail("\n".join(outcome.log)), flush=True)

        table = markdown_table(results)
        total = time.monotonic() - started
        print()
        print(table, end="")
        caught = sum(o.result == "caught" for o in results)
        print(f"\n{caught}/{len(results)} caught; baseline {'passed' if baseline_ok else 'FAILED'}; {total:.0f} s")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table)
        return 0 if baseline_ok and caught == len(results) else 1
    finally:
        if args.keep:
            print("copies kept:", *copies, sep="\n    ")
        else:
            for copy in copies:
                shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
