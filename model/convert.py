"""HuggingFace import/export: Llama (dense), Mixtral (MoE) and Jamba (hybrid) <-> our Transformer.

A model directory of ours holds ``model_config.json`` (``dataclasses.asdict(ModelConfig)``),
``model.safetensors`` (our state dict; a tied LM head is stored once, as ``embed.weight``) and, optionally,
a sentencepiece ``tokenizer.model``.

    python -m model.convert from-hf HF_DIR OUT_DIR
    python -m model.convert to-hf CKPT_DIR HF_DIR

Our RoPE uses the rotate_half layout HF Llama/Mixtral use, so q/k weights are copied without permutation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import Transformer

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
HF_TYPE = {"dense": "llama", "moe": "mixtral", "hybrid": "jamba"}
FAMILY = {v: k for k, v in HF_TYPE.items()}
# Names of our stacked expert tensors -> the per-expert HF linear holding them, per HF family.
EXPERT_NAMES = {
    "mixtral": {"w1": "w1", "w2": "w2", "w3": "w3"},
    "jamba": {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"},
}
# Config fields with the same meaning in both: ours -> HF's (converted the same way in both directions).
COMMON_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size",
    "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}
JAMBA_FIELDS = {
    "expert_layer_period": "expert_layer_period", "expert_layer_offset": "expert_layer_offset",
    "aux_loss_coeff": "router_aux_loss_coef", "attn_layer_period": "attn_layer_period",
    "attn_layer_offset": "attn_layer_offset", "mamba_d_state": "mamba_d_state", "mamba_d_conv": "mamba_d_conv",
    "mamba_expand": "mamba_expand", "mamba_conv_bias": "mamba_conv_bias", "mamba_proj_bias": "mamba_proj_bias",
}
# Buffers that HF checkpoints may carry but that are derived, not learned.
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


class UntrustedFileError(ValueError):
    """A weights file holds a pickle that would build more than tensors and plain data."""


# ---------------------------------------------------------------------------------------------- configs
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig for a ``LlamaConfig``, ``MixtralConfig`` or ``JambaConfig``."""
    model_type = getattr(hf_config, "model_type", None)
    _require(model_type in FAMILY, f"unsupported HF model_type {model_type!r}; supported: llama, mixtral, jamba")
    _require(hf_config.hidden_act == "silu", f"hidden_act={hf_config.hidden_act!r} is unsupported; only silu (SwiGLU)")
    _require(getattr(hf_config, "sliding_window", None) is None, "sliding-window attention is not supported")
    _require(not getattr(hf_config, "attention_bias", False), "attention_bias=True is not supported")
    _require(not getattr(hf_config, "mlp_bias", False), "mlp_bias=True is not supported")
    _require(getattr(hf_config, "rope_scaling", None) is None, "rope_scaling is not supported (plain RoPE only)")
    common = {ours: getattr(hf_config, theirs) for ours, theirs in COMMON_FIELDS.items()}
    common.update(
        name=f"{model_type}_from_hf", family=FAMILY[model_type], head_dim=getattr(hf_config, "head_dim", None),
        tie_embeddings=bool(common["tie_embeddings"]),
    )
    if model_type == "llama":
        return ModelConfig(**common, rope_theta=hf_config.rope_theta).validate()
    if model_type == "mixtral":
        return ModelConfig(
            **common,
            rope_theta=hf_config.rope_theta,
            num_experts=hf_config.num_local_experts,
            top_k=hf_config.num_experts_per_tok,
            moe_renormalize=True,
            aux_loss_coeff=hf_config.router_aux_loss_coef,
        ).validate()
    # Jamba: no positional encoding in attention, num_experts == 1 means a plain MLP everywhere.
    return ModelConfig(
        **common,
        use_rope=False,
        num_experts=hf_config.num_experts if hf_config.num_experts > 1 else 0,
        top_k=hf_config.num_experts_per_tok,
        moe_renormalize=False,  # Jamba weighs experts by their raw softmax probabilities
        mamba_dt_rank=hf_config.mamba_dt_rank,
        **{ours: getattr(hf_config, theirs) for ours, theirs in JAMBA_FIELDS.items()},
    ).validate()


def config_to_hf(cfg: ModelConfig, use_mamba_kernels: bool = False):
    """The transformers config of the matching family (Llama / Mixtral / Jamba).

    Jamba is written with ``use_mamba_kernels=False`` by default so that it loads and runs on CPU;
    pass True (or edit config.json) on a GPU machine with mamba-ssm installed.
    """
    from transformers import JambaConfig, LlamaConfig, MixtralConfig

    cfg.validate()
    common = {theirs: getattr(cfg, ours) for ours, theirs in COMMON_FIELDS.items()} | {"hidden_act": "silu"}
    if cfg.family == "dense":
        _require(cfg.use_rope, "a dense model without RoPE has no Llama equivalent (set use_rope=true)")
        return LlamaConfig(**common, head_dim=cfg.resolved_head_dim, rope_theta=cfg.rope_theta)
    if cfg.num_experts > 0 and cfg.capacity_factor is not None:
        warnings.warn(
            f"capacity_factor={cfg.capacity_factor}: HF MoE layers are dropless, so outputs differ wherever tokens "
            "were dropped here",
            stacklevel=2,
        )
    if cfg.family == "moe":
        _require(cfg.moe_renormalize, "Mixtral renormalises the top-k weights; moe_renormalize must be true")
        _require(cfg.use_rope, "a MoE model without RoPE has no Mixtral equivalent (set use_rope=true)")
        _require(
            (cfg.expert_layer_period, cfg.expert_layer_offset) == (1, 0),
            "Mixtral has experts in every layer; expert_layer_period must be 1 and expert_layer_offset 0",
        )
        return MixtralConfig(
            **common,
            head_dim=cfg.resolved_head_dim,
            rope_theta=cfg.rope_theta,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.aux_loss_coeff,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    _require(
        cfg.num_experts == 0 or not cfg.moe_renormalize,
        "Jamba weighs experts by raw softmax probabilities; moe_renormalize must be false to export a hybrid",
    )
    _require(not cfg.use_rope, "Jamba attention has no RoPE; a hybrid model must use use_rope=false to export")
    _require(
        cfg.resolved_head_dim * cfg.n_heads == cfg.d_model, "Jamba needs head_dim == d_model / n_heads (unset head_dim)"
    )
    return JambaConfig(
        **common,
        num_experts=max(cfg.num_experts, 1),
        num_experts_per_tok=cfg.top_k if cfg.num_experts > 0 else 1,
        use_mamba_kernels=use_mamba_kernels,
        mamba_dt_rank=cfg.resolved_dt_rank,
        sliding_window=None,
        **{theirs: getattr(cfg, ours) for ours, theirs in JAMBA_FIELDS.items()},
    )


# ---------------------------------------------------------------------------------------- state dicts
def _prefix_map(cfg: ModelConfig) -> tuple[dict[str, str], dict[int, str]]:
    """(our prefix -> HF prefix for plain renames, layer index -> HF prefix of its experts)."""
    hf_type = HF_TYPE[cfg.family]
    jamba = hf_type == "jamba"
    renames = {"embed.": "model.embed_tokens.", "norm.": "model.final_layernorm." if jamba else "model.norm."}
    if not cfg.tie_embeddings:
        renames["lm_head."] = "lm_head."
    experts: dict[int, str] = {}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        renames[ours + "mixer_norm."] = hf + "input_layernorm."
        renames[ours + "ffn_norm."] = hf + ("pre_ff_layernorm." if jamba else "post_attention_layernorm.")
        mixer = "self_attn." if cfg.is_attention_layer(i) else "mamba."
        renames[ours + "mixer."] = hf + mixer
        if not cfg.is_moe_layer(i):
            renames[ours + "ffn."] = hf + ("feed_forward." if jamba else "mlp.")
        elif jamba:
            renames[ours + "ffn.router."] = hf + "feed_forward.router."
            experts[i] = hf + "feed_forward.experts."
        else:
            renames[ours + "ffn.router."] = hf + "block_sparse_moe.gate."
            experts[i] = hf + "block_sparse_moe.experts."
    return renames, experts


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map an HF state dict (Llama/Mixtral/Jamba naming) to ours. Raises on any unused HF tensor.

    The MoE ``expert_bias`` buffer has no HF counterpart; it is omitted (the module's default, zeros, stays).
    With tied embeddings the result has ``embed.weight`` only (load with ``load_state_dict(strict=False)``
    or :func:`load_into`).
    """
    remaining = {k: v for k, v in hf_sd.items() if not IGNORED_HF_KEYS.match(k)}
    renames, experts = _prefix_map(cfg)
    names = EXPERT_NAMES.get(HF_TYPE[cfg.family], {})
    out: dict[str, torch.Tensor] = {}
    for i, hf_prefix in experts.items():
        for ours, hf_name in names.items():
            keys = [f"{hf_prefix}{e}.{hf_name}.weight" for e in range(cfg.num_experts)]
            missing = [k for k in keys if k not in remaining]
            _require(not missing, f"HF state dict lacks expert weight {missing[0] if missing else ''}")
            out[f"layers.{i}.ffn.{ours}"] = torch.stack([remaining.pop(k) for k in keys])
    # Longest prefixes first so "ffn.router." wins over a shorter overlapping prefix.
    for ours, hf in sorted(renames.items(), key=lambda kv: -len(kv[1])):
        for key in [k for k in remaining if k.startswith(hf)]:
            out[ours + key[len(hf) :]] = remaining.pop(key)
    if cfg.tie_embeddings:
        remaining.pop("lm_head.weight", None)  # HF state_dict() lists the tied head; it is embed.weight
    _require(not remaining, f"unexpected HF tensors for this config, e.g. {sorted(remaining)[:3]}")
    return out


def state_dict_to_hf(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, drop_expert_bias: bool = False
) -> dict[str, torch.Tensor]:
    """Map our state dict to HF naming. A tied LM head is emitted once, as ``model.embed_tokens.weight``.

    HF Mixtral/Jamba have no aux-loss-free selection bias: a non-zero ``expert_bias`` would route differently
    there, so it raises unless ``drop_expert_bias=True``.
    """
    remaining = dict(sd)
    if cfg.tie_embeddings:
        remaining.pop("lm_head.weight", None)
    for key in [k for k in remaining if k.endswith(".expert_bias")]:
        bias = remaining.pop(key)
        if bias.abs().max().item() != 0 and not drop_expert_bias:
            raise ValueError(
                f"{key} is non-zero (aux-loss-free balancing) and HF has no equivalent; "
                "pass --drop-expert-bias to export anyway (routing will differ)"
            )
    renames, experts = _prefix_map(cfg)
    names = EXPERT_NAMES.get(HF_TYPE[cfg.family], {})
    out: dict[str, torch.Tensor] = {}
    for i, hf_prefix in experts.items():
        for ours, hf_name in names.items():
            stacked = remaining.pop(f"layers.{i}.ffn.{ours}")
            for e in range(cfg.num_experts):
                out[f"{hf_prefix}{e}.{hf_name}.weight"] = stacked[e].clone()
    for ours, hf in sorted(renames.items(), key=lambda kv: -len(kv[0])):
        for key in [k for k in remaining if k.startswith(ours)]:
            out[hf + key[len(ours) :]] = remaining.pop(key)
    _require(not remaining, f"state dict has tensors with no HF mapping: {sorted(remaining)[:3]}")
    return out


def load_into(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that tolerates only what our format leaves out: a tied head and the expert_bias buffer."""
    result = model.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    missing = [k for k in result.missing_keys if k not in allowed and not k.endswith(".expert_bias")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"state dict does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def _check_against(
    expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], what: str, optional: set[str] = frozenset()
) -> None:
    """Key and shape check of ``sd`` against a (meta-device) reference state dict; ``optional`` keys may be absent."""
    absent = sorted(k for k in set(expected) - set(sd) if k not in optional)
    _require(not absent, f"{what}: missing tensors, e.g. {absent[:3]}")
    for key, tensor in sd.items():
        _require(key in expected, f"{what}: unexpected tensor {key}")
        _require(
            tuple(expected[key].shape) == tuple(tensor.shape),
            f"{what}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}",
        )


# ---------------------------------------------------------------------------------- our model directory
def save_state_dict_dir(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, tokenizer_model: str | Path | None = None
) -> Path:
    """Write ``model_config.json`` + ``model.safetensors`` (+ ``tokenizer.model`` if given and present)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # safetensors refuses shared storage; embed.weight is the head
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tokenizer = Path(tokenizer_model) if tokenizer_model is not None else None
    if tokenizer is not None and tokenizer.is_file() and tokenizer.resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    return out


def save_model_dir(
    model: Transformer, cfg: ModelConfig, out_dir: str | Path, tokenizer_model: str | Path | None = None
) -> Path:
    """Save a consolidated (single-file, unsharded) model directory of ours."""
    return save_state_dict_dir(model.state_dict(), cfg, out_dir, tokenizer_model)


def load_config_dir(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a model directory (needs {CONFIG_FILE})")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, ModelConfig]:
    """Build the model from ``model_config.json`` and load ``model.safetensors`` into it (float32 parameters)."""
    cfg = load_config_dir(model_dir)
    with torch.device(device):
        model = Transformer(cfg)
    load_into(model, load_file(str(Path(model_dir) / WEIGHTS_FILE), device=str(device)))
    return model, cfg


# ----------------------------------------------------------------------------------------- HF directory
def load_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (``*.safetensors``, sharded or not, else ``*.bin``)."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    files = sorted(Path(hf_dir).glob("pytorch_model*.bin"))
    _require(bool(files), f"no *.safetensors or pytorch_model*.bin weights in {hf_dir}")
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"loads {found.group(1)}" if found else "uses instructions beyond plain tensors and data"
            raise UntrustedFileError(
                f"{f} holds a pickle that {what}, which is not allowed (files are never unpickled with arbitrary "
                "code); the file was tampered with or holds more than weights: use its safetensors version"
            ) from None
    return sd


def _meta_state_dict(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our state dict's keys and shapes for ``cfg`` (no memory), and the keys a model directory may omit."""
    with torch.device("meta"):
        sd = Transformer(cfg).state_dict()
    optional = {k for k in sd if k.endswith(".expert_bias")} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    return sd, optional


def from_hf_dir(hf_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """Convert an HF Llama/Mixtral/Jamba directory into a model directory of ours (dtype preserved)."""
    from transformers import AutoConfig

    cfg = config_from_hf(AutoConfig.from_pretrained(hf_dir))
    sd = state_dict_from_hf(load_hf_weights(hf_dir), cfg)
    expected, optional = _meta_state_dict(cfg)
    _check_against(expected, sd, f"from-hf {hf_dir}", optional)
    save_state_dict_dir(sd, cfg, out_dir, Path(hf_dir) / TOKENIZER_FILE)
    return cfg


def _save_tokenizer_hf(tokenizer_model: Path, hf_dir: Path, hf_config) -> None:
    """Write a sentencepiece model as a ``LlamaTokenizer`` (the tokenizer class of Llama, Mixtral and Jamba)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    tok = LlamaTokenizer(
        vocab_file=str(tokenizer_model),
        unk_token=piece(sp.unk_id()),
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        pad_token=piece(sp.pad_id()),
        add_bos_token=sp.bos_id() >= 0,
        add_eos_token=False,
        legacy=False,
    )
    tok.save_pretrained(str(hf_dir))
    for name, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id())):
        setattr(hf_config, name, i if i >= 0 else None)


def to_hf_dir(ckpt_dir: str | Path, hf_dir: str | Path, drop_expert_bias: bool = False) -> None:
    """Write a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads (weights' dtype preserved)."""
    from transformers import AutoModelForCausalLM

    cfg = load_config_dir(ckpt_dir)
    sd = load_file(str(Path(ckpt_dir) / WEIGHTS_FILE))
    expected, optional = _meta_state_dict(cfg)
    _check_against(expected, sd, f"to-hf {ckpt_dir}", optional)
    hf_config = config_to_hf(cfg)
    hf_sd = state_dict_to_hf(sd, cfg, drop_expert_bias=drop_expert_bias)
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(hf_config).state_dict()
    _check_against(expected, hf_sd, "to-hf", {"lm_head.weight"} if cfg.tie_embeddings else set())
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(ckpt_dir) / TOKENIZER_FILE
    if tokenizer.is_file():
        _save_tokenizer_hf(tokenizer, out, hf_config)
    # transformers >= 4.56 calls it `dtype`; older versions `torch_dtype`.
    setattr(hf_config, "dtype" if "dtype" in vars(hf_config) else "torch_dtype", next(iter(sd.values())).dtype)
    hf_config.architectures = [type(hf_config).__name__.replace("Config", "ForCausalLM")]
    hf_config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-hf", help="HF Llama/Mixtral/Jamba directory -> model directory of ours")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p = sub.add_parser("to-hf", help="model directory of ours -> HF directory (AutoModelForCausalLM)")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.add_argument("--drop-expert-bias", action="store_true", help="export although expert_bias is non-zero")
    args = parser.parse_args(argv)
    try:
        if args.command == "from-hf":
            cfg = from_hf_dir(args.hf_dir, args.out_dir)
            print(f"wrote {args.out_dir} ({cfg.family}, {cfg.n_layers} layers)")
        else:
            to_hf_dir(args.ckpt_dir, args.hf_dir, drop_expert_bias=args.drop_expert_bias)
            print(f"wrote {args.hf_dir}")
    except UntrustedFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
