"""Scaling-law fits, the report CLI and the ladder helper, on synthetic runs drawn from a known law."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from tests.wandb_records import read_records
from train import scaling
from train.scaling.fit import PARAM_NAMES, compute_frontier, compute_optimal, fit_chinchilla, fit_compute_frontier
from train.scaling.ladder import dense_param_counts, ladder, model_shape_for_params, scaled_hparams, shape_for

REPO = Path(__file__).resolve().parents[1]
TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}
TRUE_PARAMS = tuple(TRUE[k] for k in PARAM_NAMES)


def law(n, d):
    return TRUE["E"] + TRUE["A"] / np.power(n, TRUE["alpha"]) + TRUE["B"] / np.power(d, TRUE["beta"])


def write_run(run_dir: Path, n: float, d: float, n_points: int = 40, eval_every: int = 10, final_loss=None) -> None:
    """A finished run in the trainer's format; its loss curve follows the law at the tokens seen so far."""
    run_dir.mkdir(parents=True)
    fpt = 6.0 * n
    lines = []
    for step in range(1, n_points + 1):
        tokens = d * step / n_points
        loss = float(law(n, tokens))
        lines.append({"step": step, "tokens": int(tokens), "flops": fpt * tokens, "loss": loss, "ce_loss": loss,
                      "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.1})
        if step % eval_every == 0:
            lines.append({"step": step, "tokens": int(tokens), "flops": fpt * tokens, "eval_loss": loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    final = float(law(n, d)) if final_loss is None else final_loss
    summary = {"model": run_dir.name, "family": "dense", "n_params": int(n), "n_active_params": int(n),
               "n_nonembedding_params": int(0.8 * n), "n_active_nonembedding_params": int(0.8 * n),
               "tokens": int(d), "flops": fpt * d, "final_train_loss": lines[-2]["loss"], "eval_loss": final,
               "seq_len": 128, "global_batch_size": 32, "steps": n_points, "flops_per_token": fpt}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text(f"model:\n  name: {run_dir.name}\n")


def write_ladder(root: Path, sizes=(1e6, 4e6, 1.6e7, 6.4e7, 2.56e8), tokens_per_param=(5, 20, 80)) -> list[Path]:
    dirs = []
    for n in sizes:
        for tpp in tokens_per_param:
            dirs.append(root / f"n{n:.3g}_tpp{tpp}")
            write_run(dirs[-1], n, tpp * n)
    return dirs


# ------------------------------------------------------------------ fits
def test_fit_recovers_law_and_bootstrap_intervals_cover_truth():
    rng = np.random.default_rng(1234)
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6)))
    loss = law(n, d) * np.exp(rng.normal(0.0, 0.005, n.shape))  # 0.5% multiplicative noise
    fit = fit_chinchilla(n, d, loss, n_bootstrap=200, seed=0)
    for name in ("E", "alpha", "beta"):
        assert abs(getattr(fit, name) - TRUE[name]) / TRUE[name] < 0.05, (name, getattr(fit, name))
    assert fit.bootstrap_params.shape == (200, 5)
    for name in PARAM_NAMES:
        lo, hi = fit.intervals[name]
        assert lo <= TRUE[name] <= hi, (name, lo, hi)
        assert lo <= getattr(fit, name) <= hi
    # The same seed gives the same intervals; another seed gives different resamples.
    again = fit_chinchilla(n, d, loss, n_bootstrap=20, seed=0)
    assert again.intervals != fit_chinchilla(n, d, loss, n_bootstrap=20, seed=1).intervals
    assert again.intervals == fit_chinchilla(n, d, loss, n_bootstrap=20, seed=0).intervals


def test_fit_is_exact_on_noiseless_runs_and_predicts():
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e5, 1e8, 5), np.geomspace(1e7, 1e10, 4)))
    fit = fit_chinchilla(n, d, law(n, d), n_bootstrap=0)
    np.testing.assert_allclose(fit.params, TRUE_PARAMS, rtol=1e-4)
    np.testing.assert_allclose(fit.predict(3e9, 7e10), law(3e9, 7e10), rtol=1e-5)
    assert fit.intervals == {} and fit.bootstrap_params is None


def test_fit_needs_as_many_runs_as_parameters():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_chinchilla([1e6, 2e6, 4e6, 8e6], [1e8] * 4, [3.0, 2.9, 2.8, 2.7])
    with pytest.raises(ValueError, match="positive"):
        fit_chinchilla([1e6, -1, 4e6, 8e6, 1e7], [1e8] * 5, [3.0] * 5)


@pytest.mark.parametrize("flops_per_param", [6.0, 7.3])
def test_compute_optimal_closed_form_matches_numerical_minimisation(flops_per_param):
    for budget in (1e17, 1e21, 1e25):
        n_opt, d_opt = compute_optimal(TRUE_PARAMS, budget, flops_per_param)
        assert flops_per_param * n_opt * d_opt == pytest.approx(budget, rel=1e-12)

        def loss_at(log_n, budget=budget):
            return law(math.exp(log_n), budget / (flops_per_param * math.exp(log_n)))

        res = minimize_scalar(loss_at, bounds=(math.log(1e2), math.log(budget / flops_per_param) - math.log(1e2)),
                              method="bounded", options={"xatol": 1e-10})
        assert math.exp(res.x) == pytest.approx(float(n_opt), rel=1e-5)
        assert law(n_opt, d_opt) <= res.fun + 1e-12


def test_frontier_fit_recovers_power_law_exponent():
    # Curves that each touch L = 50 C^-0.12 at one compute and lie above it elsewhere.
    cs, ls = [], []
    for c0 in np.geomspace(1e12, 1e20, 25):
        c = np.geomspace(c0 / 3, c0 * 3, 60)
        cs.append(c)
        ls.append(50.0 * c**-0.12 * np.exp(0.05 * np.log(c / c0) ** 2))
    c, loss = np.concatenate(cs), np.concatenate(ls)
    fit = fit_compute_frontier(c, loss)
    assert fit.b == pytest.approx(0.12, rel=0.01)
    assert fit.a == pytest.approx(50.0, rel=0.05)
    assert not fit.irreducible and fit.E == 0.0
    # The envelope is the Pareto frontier: decreasing, and below every point at lower compute.
    env_c, env_l = compute_frontier(c, loss)
    assert np.all(np.diff(env_c) > 0) and np.all(np.diff(env_l) < 0)
    for ci, li in zip(env_c, env_l):
        assert li <= loss[c <= ci].min()


def test_frontier_with_irreducible_term_on_chinchilla_curves():
    # The compute-optimal envelope of L(N, D) is exactly E + a C^-(alpha beta / (alpha + beta)).
    cs, ls = [], []
    for n in np.geomspace(1e6, 1e9, 30):
        tokens = np.geomspace(n, 300 * n, 80)
        cs.append(6 * n * tokens)
        ls.append(law(n, tokens))
    fit = fit_compute_frontier(np.concatenate(cs), np.concatenate(ls), irreducible=True)
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    assert fit.b == pytest.approx(alpha * beta / (alpha + beta), rel=0.03)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.03)
    with pytest.raises(ValueError, match="frontier has 2 points"):
        fit_compute_frontier([1e10, 1e12], [3.0, 2.0])


# ------------------------------------------------------------------ the report CLI
def test_report_cli_writes_json_markdown_and_plot(tmp_path, capsys):
    write_ladder(tmp_path / "runs")
    out = tmp_path / "report"
    rc = scaling.main(["report", str(tmp_path / "runs"), "--out", str(out), "--budget", "1e21", "--target-n", "3e9",
                       "--target-d", "6e10", "--holdout-largest", "--bootstrap", "20"])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 15
    for row in report["runs"]:
        assert abs(row["relative_residual"]) < 1e-4
        assert row["loss_source"] == "eval_loss"
    fit = report["fit"]
    np.testing.assert_allclose([fit[k] for k in PARAM_NAMES], TRUE_PARAMS, rtol=1e-3)
    assert set(fit["intervals"]) == set(PARAM_NAMES) and fit["n_bootstrap"] == 20
    assert report["target"]["predicted_loss"] == pytest.approx(law(3e9, 6e10), rel=1e-4)
    budget = report["budget"]
    n_opt, d_opt = compute_optimal([fit[k] for k in PARAM_NAMES], 1e21, 6.0)
    assert budget["N_opt"] == pytest.approx(n_opt) and budget["D_opt"] == pytest.approx(d_opt)
    assert budget["measured_flops_per_param"] == pytest.approx(6.0)
    # Noiseless runs: the 4 smaller sizes predict the largest size almost exactly.
    held = report["holdout"]
    assert [r["N"] for r in held["runs"]] == [2.56e8] * 3
    assert held["max_relative_error"] < 1e-3
    # The fitted frontier falls monotonically over and beyond the runs' compute.
    fr = report["frontier"]
    assert fr["b"] > 0
    grid = np.geomspace(fr["flops_range"][0] / 10, fr["flops_range"][1] * 10, 200)
    assert np.all(np.diff(fr["a"] * grid ** -fr["b"]) < 0)

    md = (out / "report.md").read_text()
    assert md in printed
    assert md.count("| n") == 15 + 3  # one table row per run, plus the held-out runs
    assert "## Compute-optimal allocation" in md and "## Hold-out" in md
    from PIL import Image

    with Image.open(out / "scaling.png") as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 300
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # something was drawn


def test_report_params_kind_and_train_loss_fallback(tmp_path):
    dirs = write_ladder(tmp_path / "runs", sizes=(1e6, 4e6, 1.6e7), tokens_per_param=(10, 40))
    summary = json.loads((dirs[0] / "summary.json").read_text())
    summary["eval_loss"] = None
    (dirs[0] / "summary.json").write_text(json.dumps(summary))
    runs = scaling.load_runs([tmp_path / "runs"], params="nonembedding")
    assert [r.n_params for r in runs[:2]] == [0.8e6, 0.8e6]
    first = next(r for r in runs if r.path == dirs[0])
    assert first.loss_source == "final_train_loss" and first.loss == summary["final_train_loss"]
    assert len(first.curve["loss"]) == 40 and len(first.curve["eval_loss"]) == 4


def test_report_wandb_offline_logs_table_and_image(tmp_path):
    write_ladder(tmp_path / "runs", sizes=(1e6, 4e6, 1.6e7), tokens_per_param=(10, 40))
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no WANDB_MODE: offline is the default
    env.update({"PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "train.scaling", "report", str(tmp_path / "runs"), "--out", str(out),
                           "--wandb", "--bootstrap", "0"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_records(files[0])
    media = {}
    curves = set()
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                key = tuple(item.nested_key) or (item.key,)
                media[key] = json.loads(item.value_json)
                if key[0].startswith("loss/"):
                    curves.add(key[0])
    assert media[("runs", "_type")] == "table-file"
    assert media[("scaling", "_type")] == "image-file"
    assert media[("frontier", "_type")] == "table-file"
    assert len(curves) == 6
    steps = {rec.metric.glob_name: rec.metric.step_metric for rec in records if rec.WhichOneof("record_type") == "metric"}
    assert steps["loss/*"] == "flops"
    run_files = files[0].parent / "files"
    table = json.loads((run_files / media[("runs", "path")]).read_text())
    report = json.loads((out / "report.json").read_text())
    assert [row[0] for row in table["data"]] == [r["name"] for r in report["runs"]]
    from PIL import Image

    with Image.open(run_files / media[("scaling", "path")]) as img:
        assert (img.width, img.height) == (media[("scaling", "width")], media[("scaling", "height")])


def test_report_errors_are_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert scaling.main(["report", str(tmp_path / "empty")]) == 2
    assert "no runs found" in capsys.readouterr().err

    write_ladder(tmp_path / "runs", sizes=(1e6, 4e6), tokens_per_param=(10, 40))
    unfinished = tmp_path / "runs" / "n9e6_unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text('{"step": 1, "tokens": 10, "flops": 1.0, "loss": 5.0}\n')
    assert scaling.main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "n9e6_unfinished has no summary.json" in err and "did not finish" in err

    # Skipping the unfinished run leaves 4 runs for 5 free parameters.
    assert scaling.main(["report", str(tmp_path / "runs"), "--skip-unfinished", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "4 runs" in err and "at least 5" in err

    write_run(tmp_path / "runs" / "n1.6e7", 1.6e7, 3.2e8)
    args = ["report", str(tmp_path / "runs"), "--skip-unfinished", "--out", str(tmp_path / "o"), "--bootstrap", "0"]
    assert scaling.main([*args, "--holdout-largest"]) == 2
    assert "--holdout-largest" in capsys.readouterr().err
    assert scaling.main([*args, "--target-n", "1e9"]) == 2
    assert "--target-d" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


# ------------------------------------------------------------------ the ladder
def test_model_shapes_follow_the_rule_and_hit_the_target():
    model = pytest.importorskip("model.transformer")
    for target in (1e6, 3e6, 1e7, 3e7, 1e8):
        shape = model_shape_for_params(target, 8000)
        n = shape["n_params_nonembedding"]
        assert abs(math.log(n / target)) < 0.15, (target, n)
        assert 32 <= shape["d_model"] / shape["n_layers"] <= 64
        head_dim = 32 if shape["d_model"] < 512 else 64
        assert shape["n_heads"] * head_dim == shape["d_model"]
        assert shape["ffn_hidden"] % 32 == 0 and abs(shape["ffn_hidden"] - 8 / 3 * shape["d_model"]) <= 16
    # The counts are the trainer's: compare with a built model.
    small = shape_for(96, 2, kv_group=3)
    assert small.n_kv_heads == 1
    built = model.Transformer(small.model_config(vocab_size=500))
    counts = dense_param_counts(small, 500)
    assert counts["total"] == sum(p.numel() for p in built.parameters())
    with pytest.raises(ValueError, match="at least"):
        model_shape_for_params(1e5, 8000)


def test_scaled_hparams_follow_the_power_laws():
    base = scaled_hparams(1e6, 3e-3, 1e6, seq_len=128, base_batch_size=32)
    assert base["lr"] == pytest.approx(3e-3) and base["global_batch_size"] == 32
    big = scaled_hparams(1.6e7, 3e-3, 1e6, seq_len=128, base_batch_size=32)
    assert big["lr"] == pytest.approx(3e-3 * 16**-0.25, rel=1e-12)
    assert big["global_batch_size"] % 16 == 0
    assert abs(big["global_batch_size"] / (32 * 16**0.65) - 1) < 0.05
    for hp, n in ((base, 1e6), (big, 1.6e7)):
        assert hp["tokens"] == hp["steps"] * hp["global_batch_size"] * 128
        assert abs(hp["tokens"] - 20 * n) <= hp["global_batch_size"] * 128 / 2


def test_ladder_cli_prints_hydra_overrides(capsys):
    assert scaling.main(["ladder", "--sizes", "1e6,3e6", "--vocab", "8000", "--seq-len", "128",
                         "--tokens-per-param", "10,20", "--run-dir-prefix", "runs/ladder"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x and not x.startswith("#")]
    assert len(lines) == 4
    rungs = ladder([1e6, 3e6], 8000, 128, tokens_per_param=(10, 20))
    for line, rung in zip(lines, rungs):
        overrides = dict(item.split("=", 1) for item in line.split())
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
            assert int(overrides[f"model.{key}"]) == rung[key]
        assert int(overrides["train.steps"]) == rung["steps"]
        assert int(overrides["train.global_batch_size"]) == rung["global_batch_size"]
        assert float(overrides["optim.lr"]) == pytest.approx(rung["lr"], rel=1e-3)
        assert int(overrides["sched.warmup_steps"]) == max(1, round(0.05 * rung["steps"]))
        assert int(overrides["model.max_seq_len"]) == 128 and overrides["model.tie_embeddings"] == "false"
        assert overrides["run_dir"] == f"runs/ladder/{rung['name']}"
    assert rungs[0]["lr"] == pytest.approx(3e-3)  # the smallest rung is the base
    assert rungs[1]["tokens"] > rungs[0]["tokens"]  # tokens_per_param 20 vs 10 at the same size
