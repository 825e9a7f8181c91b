"""Hydra entry point: `python -m train`, `torchrun -m train`, `deepspeed --module train`."""

from __future__ import annotations

import os
import re
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from data.stream import DataConfigError
from model.config import ConfigError
from train.config import build_run_config
from train.engine import ensure_distributed_env

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecated; one warning per call floods the logs.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _default_run_dir(single_run_dir: str) -> str:
    """In a --multirun sweep every job gets Hydra's per-job directory; otherwise a fixed path."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return single_run_dir
    return hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else single_run_dir


OmegaConf.register_new_resolver("default_run_dir", _default_run_dir, replace=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> int:
    ensure_distributed_env()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run_cfg = build_run_config(resolved)
    except (ConfigError, DataConfigError, OmegaConfBaseException) as e:
        _print_config_error(e)
        if multirun:
            raise
        sys.exit(2)

    from train.trainer import run  # heavy imports (DeepSpeed) only after the config is valid

    code = run(run_cfg, OmegaConf.to_yaml(cfg, resolve=True))
    if multirun and code != 0:
        raise RuntimeError(f"training job exited with code {code}")
    if not multirun and code != 0:
        sys.exit(code)
    return code


def config_error_line(e: Exception) -> str:
    """One line for a refused config: the key, what is wrong, the fix (Hydra's and OmegaConf's own messages
    span several lines and end with a hint about stack traces)."""
    if isinstance(e, ConfigError | DataConfigError):
        return f"config error: {e}"
    if isinstance(e, OverrideParseException):
        named = re.search(r"override '(.+)'", str(e))
        bad = named.group(1) if named else _unparsable_override(sys.argv[1:])
        if bad is not None:
            return (f"config error: {bad.split('=', 1)[0]}: cannot parse the override {bad!r}; quote it for the shell "
                    "and put brackets, commas or spaces inside quotes, e.g. 'data.sources=[{path: dir}]'")
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = f"; available: {', '.join(e.options)}" if e.options else ""
        return f"config error: {group or name}: no config named {name!r} in conf/{group}{options}"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(e, ConfigCompositionException) and isinstance(cause, ConfigKeyError | AttributeError) and key:
        return (
            f"config error: {key}: unknown key; check its spelling (`python -m train --cfg job` prints every "
            f"key) or add a new one with +{key}=VALUE"
        )
    lines = [ln.strip() for ln in str(cause).splitlines()]
    text = "; ".join(ln for ln in lines if ln and not ln.startswith(("full_key:", "object_type=")))
    return f"config error: {key}: {text}" if key else f"config error: {text}"


def _unparsable_override(args: list[str]) -> str | None:
    """The first command-line override Hydra's grammar rejects (its error does not say which)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            return arg
    return None


def _print_config_error(e: Exception) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(config_error_line(e), file=sys.stderr, flush=True)


def _strip_launcher_args(argv: list[str]) -> list[str]:
    # The deepspeed launcher appends --local_rank=N, which Hydra would reject as an override;
    # LOCAL_RANK is also in the environment, so the argument carries nothing we need.
    return [a for a in argv if not a.startswith("--local_rank")]


def cli() -> None:
    """`python -m train`: Hydra's entry with its errors as one line and exit code 2."""
    sys.argv = _strip_launcher_args(sys.argv)
    # Hydra prints composition errors (unknown key, missing config, bad override syntax) over several lines; with
    # HYDRA_FULL_ERROR it raises them instead, and they become one line here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        _print_config_error(e)
        sys.exit(2)
    except (ConfigError, DataConfigError):  # a --multirun job's, already printed by main()
        sys.exit(2)


if __name__ == "__main__":
    cli()
