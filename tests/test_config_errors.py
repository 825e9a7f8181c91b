"""Every invalid config or override is refused before any process group or heavy import, with one line that names
the key and the fix: in-process through Hydra's compose and build_run_config, and through the real CLI."""

from __future__ import annotations

import subprocess

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from model.config import ConfigError
from tests.utils import PYTHON, REPO, TINY, child_env, run_train
from train.__main__ import config_error_line
from train.config import build_run_config


def _build(overrides: list[str], run_dir: str = "unused", world_size: int = 1):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides, f"run_dir={run_dir}"])
    return build_run_config(OmegaConf.to_container(cfg, resolve=True), world_size=world_size)


# (overrides, world size, the key named, a fragment of the message)
INVALID = [
    # wrong types, refused by the dataclass field types
    (["optim.lr=abc"], 1, "optim.lr", "expected a number, got 'abc'"),
    (["train.steps=1.5"], 1, "train.steps", "expected an integer, got 1.5"),
    (["train.seq_len=abc"], 1, "train.seq_len", "expected an integer, got 'abc'"),
    (["parallel.tp=two"], 1, "parallel.tp", "expected an integer, got 'two'"),
    (["train.micro_batch_size=[1,2]"], 1, "train.micro_batch_size", "expected an integer, got [1, 2]"),
    (["optim.betas=[0.9,high]"], 1, "optim.betas[1]", "expected a number, got 'high'"),
    (["optim.betas=0.9"], 1, "optim.betas", "expected a list of 2 numbers, got 0.9"),
    (["train.compile=maybe"], 1, "train.compile", "expected true or false, got 'maybe'"),
    (["train.stop_at=soon"], 1, "train.stop_at", "expected an integer or null, got 'soon'"),
    (["model.attn_backend=cudnn"], 1, "model.attn_backend", "expected one of auto, flash_attn, sdpa, got 'cudnn'"),
    (["model.activation_checkpointing=sometimes"], 1, "model.activation_checkpointing", "use none, full or selective"),
    (["optim.lr=inf"], 1, "optim.lr", "expected a finite number, got inf"),
    (["train.steps=${train.seed_typo}"], 1, "train.steps", "Interpolation key 'train.seed_typo' not found"),
    # ranges
    (["optim.lr=-0.001"], 1, "optim.lr", "must be positive"),
    (["train.steps=0"], 1, "train.steps", "must be >= 1, got 0"),
    (["train.steps=10", "sched.warmup_steps=11"], 1, "sched.warmup_steps", "must be in [0, train.steps=10]"),
    (["train.seed=-1"], 1, "train.seed", "must be >= 0"),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay", "must be >= 0"),
    (["model=moe_tiny", "model.top_k=5"], 1, "model.top_k", "must be in [1, num_experts=4], got 5"),
    (["model=moe_tiny", "model.expert_layer_period=0"], 1, "model.expert_layer_period", "must be >= 1"),
    (["train.keep_last=0"], 1, "train.keep_last", "must be >= 1"),
    (["train.micro_batch_size=3"], 1, "train.global_batch_size", "pick a multiple of 3"),
    (["train.seq_len=1024"], 1, "train.seq_len", "exceeds model.max_seq_len=512"),
    # unknown keys that reach the config (Hydra refuses the others: test_hydra_errors_are_one_line)
    (["+foo=1"], 1, "foo", "unknown top-level key"),
    (["+model.foo=1"], 1, "model.foo", "unknown option"),
    # impossible layouts
    (["parallel=tp2", "model.n_heads=3", "model.n_kv_heads=3", "model.d_model=96"], 2, "parallel.tp", "n_heads=3"),
    (["parallel=pp2", "model.n_layers=1"], 2, "parallel.pp", "use pp <= 1"),
    (["parallel=tp2"], 3, "parallel.tp", "world size 3 is not divisible by tp*cp*pp"),
    # data and tokenizer
    (["data.sources=[{path: /nonexistent/shards}]"], 1, "data.sources[0].path", "python -m data.prepare"),
    (["model.vocab_size=100"], 1, "model.vocab_size", "set model.vocab_size=8000"),
    (["data.sources=[{path: artifacts/data/shakespeare, weight: -1}]"], 1, "data.sources[0].weight", "positive"),
]


@pytest.mark.parametrize("overrides, world, key, message", INVALID, ids=[" ".join(c[0]) for c in INVALID])
def test_invalid_config_names_the_key(overrides, world, key, message, sample_data):
    with pytest.raises((ConfigError, ValueError)) as info:
        _build(overrides, world_size=world)
    line = config_error_line(info.value)
    assert line.startswith(f"config error: {key}: ") and message in line and "\n" not in line, line


def test_valid_values_are_converted_to_the_field_types(sample_data):
    run = _build(["train.steps=1e2", "optim.lr=1", "model.activation_checkpointing=true"])
    assert run.train.steps == 100 and type(run.train.steps) is int
    assert run.optim.lr == 1.0 and type(run.optim.lr) is float
    assert run.optim.betas == (0.9, 0.95)
    assert run.model.activation_checkpointing == "full"


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["foo=1"], "config error: foo: unknown key;"),
        (["model.foo=1"], "config error: model.foo: unknown key;"),
        (["model=nope"], "config error: model: no config named 'nope' in conf/model; available: dense_125m,"),
        (["train.steps=("], "config error: train.steps: cannot parse the override 'train.steps=('; quote it"),
    ],
)
def test_hydra_errors_are_one_line(overrides, line):
    with (
        pytest.raises(HydraException) as info,
        initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"),
    ):
        compose("config", overrides=[*overrides, "run_dir=unused"])
    assert config_error_line(info.value).startswith(line)
    assert "\n" not in config_error_line(info.value)


def test_resume_from_a_checkpoint_of_another_model_shape_is_refused(tmp_path, sample_data):
    """train.resume=auto reads the config saved beside run_dir's latest checkpoint, as the trainer writes it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        saved = compose("config", overrides=[*TINY, "model.d_model=64", f"run_dir={tmp_path}"])
    step = tmp_path / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(OmegaConf.to_yaml(saved, resolve=True))
    (tmp_path / "checkpoints" / "latest").symlink_to("step_5")

    with pytest.raises(ConfigError) as info:
        _build([], run_dir=str(tmp_path))
    assert info.value.key == "model.d_model" and "d_model=64" in info.value.message
    assert _build(["model.d_model=64"], run_dir=str(tmp_path)).model.d_model == 64  # the same shape resumes
    assert _build(["train.resume=never"], run_dir=str(tmp_path)).model.d_model == 128  # a fresh start is allowed


def test_config_errors_import_neither_deepspeed_nor_megatron(sample_data):
    code = (
        "import sys\n"
        "from tests.test_config_errors import _build\n"
        "from model.config import ConfigError\n"
        "try:\n"
        "    _build(['optim.lr=abc'])\n"
        "except ConfigError as e:\n"
        "    print(e.key)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'megatron'}))\n"
    )
    proc = subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["optim.lr", "[]"], proc.stdout


@pytest.mark.parametrize(
    "override, line",
    [
        ("optim.lr=abc", "config error: optim.lr: expected a number, got 'abc'"),
        ("train.steps=1.5", "config error: train.steps: expected an integer, got 1.5"),
        ("foo=1", "config error: foo: unknown key;"),
        ("model=nope", "config error: model: no config named 'nope'"),
        ("model.vocab_size=100", "config error: model.vocab_size: 100 is smaller than the tokenizer vocabulary"),
        ("optim.lr=[1,2", "config error: optim.lr: cannot parse the override 'optim.lr=[1,2'; quote it"),
        ("train.on_nan=maybe", "config error: train.on_nan: expected one of stop, skip, rollback, got 'maybe'"),
    ],
)
def test_cli_prints_one_line_exits_2_and_creates_nothing(override, line, tmp_path, sample_data):
    """`python -m train`'s entry (forked from this warmed process, as the trainer tests launch it)."""
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, override, f"run_dir={run_dir}"], nproc=1, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(line), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not run_dir.exists()


def test_cli_in_a_fresh_interpreter_prints_one_line_and_exits_2(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    proc = subprocess.run([PYTHON, "-m", "train", *TINY, "optim.lr=abc", f"run_dir={run_dir}"], check=False,
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "config error: optim.lr: expected a number, got 'abc'\n", proc.stderr
    assert not run_dir.exists()
