"""The scaling ladder as Hydra experiments: the committed rung configs, a real 2-rung --multirun with W&B's
FLOPs axis, and the report CLI on the sweep's run directories."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import train.__main__  # noqa: F401  (registers the run_dir resolver that conf/config.yaml uses)
from model.config import ModelConfig
from model.flops import param_counts
from tests.utils import PYTHON, REPO, child_env, read_metrics
from tests.wandb_records import history_rows, metric_definitions, read_records, wandb_files
from train import scaling
from train.config import build_run_config
from train.scaling.ladder import GENERATED_MARKER, ladder

CONF = REPO / "conf"
FAMILIES = ("dense", "moe", "hybrid")


def rung_files(family: str) -> list[Path]:
    return sorted((CONF / "experiment" / "ladder" / family).glob("*.yaml"))


def compose_rung(family: str, rung: str) -> tuple[dict, dict]:
    """(job config, Hydra sweep settings) of one sweep point of `python -m train --multirun +experiment=...`,
    inside initialize_config_dir(CONF). run_dir is given: outside a running app its ${hydra:...} default cannot
    resolve."""
    cfg = compose(
        "config", [f"+experiment=scaling_{family}", f"+experiment/ladder/{family}={rung}", "run_dir=unused"],
        return_hydra_config=True,
    )
    sweep = {"dir": cfg.hydra.sweep.dir, "subdir": cfg.hydra.sweep.subdir,
             "params": OmegaConf.to_container(cfg.hydra.sweeper.params)}
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True), sweep


def generating_commands(files: list[Path]) -> list[list[str]]:
    """The `python -m train.scaling ladder ...` lines recorded in the files, the replacing one first."""
    commands = []
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0] == "# @package _global_" and lines[1] == GENERATED_MARKER, f"{f} was not generated"
        args = shlex.split(lines[2].removeprefix("# python -m train.scaling "))
        if args not in commands:
            commands.append(args)
    return sorted(commands, key=lambda a: "--append" in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_committed_rung_configs_are_what_their_commands_generate(family, tmp_path, capsys):
    """Nobody hand-edited a rung: rerunning the recorded commands writes the same files."""
    files = rung_files(family)
    assert len(files) >= 4
    out = tmp_path / family
    for args in generating_commands(files):
        args[args.index("--write-configs") + 1] = str(out)
        assert scaling.main(args) == 0
    regenerated = sorted(out.glob("*.yaml"))
    assert [f.name for f in regenerated] == [f.name for f in files]
    for new, old in zip(regenerated, files):
        assert yaml.safe_load(new.read_text()) == yaml.safe_load(old.read_text()), old
        assert new.read_text().splitlines()[3] == old.read_text().splitlines()[3]  # the planned counts
    assert "sweep them with python -m train --multirun" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rung_is_a_valid_run_below_one_epoch(family, sample_data):
    """Hydra composes the experiment with its smallest and largest rung into a valid run config (with one run
    directory per rung); every rung's model is valid in its family and trains on less than one epoch."""
    files = rung_files(family)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        composed = {f: compose_rung(family, f.stem) for f in (files[0], files[-1])}
    for f, (cfg, sweep) in composed.items():
        rung = yaml.safe_load(f.read_text())
        assert sweep["params"] == {f"+experiment/ladder/{family}": "glob(*)"}
        assert (sweep["dir"], sweep["subdir"]) == (f"runs/scaling/{family}", rung["model"]["name"])  # a dir per rung
        run = build_run_config(cfg, world_size=1)
        assert run.model.family == family
        for key, value in rung["model"].items():
            assert getattr(run.model, key) == value, (f.name, key)
        assert (run.train.steps, run.train.global_batch_size, run.optim.lr) == (
            rung["train"]["steps"], rung["train"]["global_batch_size"], rung["optim"]["lr"])
        assert run.parallel.zero_stage == 0 and run.logging.backend == "wandb" and run.grad_accum_steps == 1
    base = cfg["model"]
    [source] = run.data.sources  # the experiment's corpus (the 512-piece one for the dense ladder)
    train_tokens = json.loads((REPO / source.path / "index.json").read_text())["splits"]["train"]["tokens"]
    for f in files:
        rung = yaml.safe_load(f.read_text())
        model = ModelConfig.from_dict({**base, **rung["model"]})  # validates
        assert model.family == family and model.max_seq_len == rung["train"]["seq_len"]
        tokens = rung["train"]["steps"] * rung["train"]["global_batch_size"] * rung["train"]["seq_len"]
        assert tokens <= train_tokens, f"{f.name}: {tokens} tokens is more than one epoch ({train_tokens})"
        assert 0 < rung["sched"]["warmup_steps"] < rung["train"]["steps"]


def test_write_configs_replaces_its_own_files_unless_appending(tmp_path):
    out = tmp_path / "group"
    out.mkdir()
    (out / "mine.yaml").write_text("# @package _global_\ntrain:\n  seed: 7\n")  # hand-written: never touched
    common = ["ladder", "--vocab", "8000", "--seq-len", "64", "--write-configs", str(out)]
    assert scaling.main([*common, "--sizes", "2.7e5", "--tokens", "1e5,2e5"]) == 0
    assert scaling.main([*common, "--sizes", "6e5", "--tokens", "1e5", "--append"]) == 0
    assert sorted(f.name for f in out.glob("*.yaml")) == [
        "mine.yaml", "n2.7e05_d1e05.yaml", "n2.7e05_d2e05.yaml", "n6.1e05_d1e05.yaml"]
    assert scaling.main([*common, "--sizes", "6e5", "--tokens", "2e5"]) == 0
    assert sorted(f.name for f in out.glob("*.yaml")) == ["mine.yaml", "n6.1e05_d2e05.yaml"]
    rung = yaml.safe_load((out / "n6.1e05_d2e05.yaml").read_text())
    [expected] = ladder([6e5], 8000, 64, tokens=[2e5])
    assert rung["train"]["steps"] * rung["train"]["global_batch_size"] * 64 == expected["tokens"]
    assert abs(expected["tokens"] - 2e5) <= expected["global_batch_size"] * 64 / 2  # D to within half a step
    with pytest.raises(ValueError, match="tokens must be positive"):
        ladder([6e5], 8000, 64, tokens=[0])


def test_dense_ladder_can_fit_and_hold_out_its_largest_size():
    """>= 4 sizes, several token budgets per size (alpha and beta separate), and >= 5 runs below the largest N
    (what `report --holdout-largest` needs to fit without it)."""
    base = yaml.safe_load((CONF / "model" / "dense_tiny.yaml").read_text())
    rungs = [yaml.safe_load(f.read_text()) for f in rung_files("dense")]
    sizes = [param_counts(ModelConfig.from_dict({**base, **r["model"]}))["nonembedding"] for r in rungs]
    budgets = {}
    for size, r in zip(sizes, rungs):
        budgets.setdefault(size, set()).add(r["train"]["steps"] * r["train"]["global_batch_size"])
    assert len(budgets) >= 4
    assert sum(1 for s in sizes if s != max(sizes)) >= scaling.N_FREE_PARAMS
    assert sum(len(b) >= 2 for b in budgets.values()) >= 2


def test_two_rung_multirun_logs_loss_against_flops_and_feeds_the_report(tmp_path, sample_data, capsys):
    """Rung configs written by `ladder --write-configs`, swept by `--multirun +experiment=scaling_dense`: each job
    trains in its own directory, W&B holds flops/loss against train/flops, and the report reads the runs (and
    refuses to fit 5 parameters to 2 runs, saying why)."""
    conf = tmp_path / "conf"
    argv = ["ladder", "--sizes", "3e4,1.3e5", "--tokens", "3072", "--vocab", "512", "--seq-len", "32",
            "--base-batch", "16", "--batch-exponent", "0", "--write-configs", str(conf / "experiment" / "ladder" / "dense")]
    assert scaling.main(argv) == 0
    rungs = {f"ladder_{r['name']}": r for r in ladder([3e4, 1.3e5], 512, 32, tokens=[3072], base_batch_size=16,
                                                       batch_exponent=0)}
    sweep = tmp_path / "sweep"
    cmd = [PYTHON, "-m", "train", "--multirun", "+experiment=scaling_dense", f"hydra.searchpath=[file://{conf}]",
           "+experiment/ladder/dense=" + ",".join(r.removeprefix("ladder_") for r in rungs),
           f"hydra.sweep.dir={sweep}", "train.eval_batches=1", "logging.log_every=2"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    for name, rung in rungs.items():
        run_dir = sweep / name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == rung["steps"] == 6 and summary["tokens"] == rung["tokens"] == 3072
        assert summary["n_active_nonembedding_params"] == rung["n_params_nonembedding"]
        metrics = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
        assert sorted(metrics) == [1, 2, 4, 6]

        files = wandb_files(run_dir)
        assert len(files) == 1, files
        records = read_records(files[0])
        assert metric_definitions(records)["flops/*"] == "train/flops"
        rows = [r for r in history_rows(records) if "flops/loss" in r]
        assert [r["_step"] for r in rows] == [1, 2, 4, 6]
        for row in rows:
            m = metrics[row["_step"]]
            assert row["flops/loss"] == pytest.approx(m["loss"], rel=1e-12)
            assert row["train/flops"] == pytest.approx(m["flops"], rel=1e-9)
            assert row["train/flops"] == pytest.approx(row["train/tokens"] * summary["flops_per_token"], rel=1e-9)

    runs = scaling.load_runs([sweep], "nonembedding")
    assert [(r.name, r.n_params, r.tokens) for r in runs] == [
        (name, float(r["n_params_nonembedding"]), 3072.0) for name, r in rungs.items()]
    capsys.readouterr()
    assert scaling.main(["report", str(sweep), "--out", str(tmp_path / "report"), "--params", "nonembedding"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 runs" in errors[0] and f"at least {scaling.N_FREE_PARAMS}" in errors[0], err
    assert not (tmp_path / "report" / "report.json").exists()
