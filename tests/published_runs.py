"""Published LLM pre-training runs for validating the layout planner (`python -m train.plan`).

`PUBLISHED_RUNS` holds measured throughput of named model shapes under named parallel layouts and
hardware; `PUBLISHED_MEMORY` holds per-GPU memory figures (analytical ones printed by the source, and
measured ones); `LAYOUT_CONTRASTS` names pairs of runs (by `id`) of one model on one machine type whose
per-GPU throughput differs by 1.5x or more because of the layout or the batch/microbatch split alone, so a
constant-MFU model cannot fit both.

Every number below was read in the cited table or text and checked against it; nothing was read off a
plot. Where a value is inferred (usually dp = gpus / (tp * pp * cp)) a comment on the row says so.
Conventions: None means the source does not state the value; percentages (MFU, HFU, % of peak) are
fractions; `global_batch_size` counts sequences; `n_params` is the source's own count; `ffn_hidden`
None means 4 * d_model (GPT MLP); throughput figures use the source's own FLOP counting, described in
`flops_counting`, which differs between sources (recompute included or not).
"""

from typing import Any

Row = dict[str, Any]

_RUN_KEYS = (
    "id", "source", "url", "model_name", "n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size",
    "seq_len", "ffn_hidden", "n_params", "tp", "pp", "dp", "cp", "ep", "gpus", "micro_batch_size",
    "global_batch_size", "pipeline_schedule", "interleaved_stages", "zero_stage", "sequence_parallel",
    "recompute", "hardware", "interconnect", "precision", "peak_tflops_per_gpu", "achieved_tflops_per_gpu",
    "pct_of_peak", "mfu", "hfu", "aggregate_pflops", "tokens_per_s", "step_time_s", "measured_max_memory_gb",
    "flops_counting", "notes",
)
_MEM_KEYS = (
    "source", "url", "model_name", "n_params", "n_layers", "d_model", "n_heads", "vocab_size", "seq_len",
    "tp", "pp", "dp", "gpus", "micro_batch_size", "global_batch_size", "zero_stage", "sequence_parallel",
    "recompute", "precision", "hardware", "interconnect", "quantity", "value", "unit", "kind", "oom", "notes",
)


def _rows(common: Row, keys: tuple[str, ...], values: list[tuple[Any, ...]]) -> list[Row]:
    """One full row per tuple: unstated fields None, then the source's shared fields, then the tuple."""
    out = []
    for v in values:
        row = {k: None for k in _RUN_KEYS} | {"cp": 1, "ep": 1} | common | dict(zip(keys, v, strict=True))
        if set(row) != set(_RUN_KEYS):
            raise KeyError(f"unknown run fields {sorted(set(row) - set(_RUN_KEYS))}")
        out.append(row)
    return out


def _mem(common: Row, **fields: Any) -> Row:
    row = {k: None for k in _MEM_KEYS} | {"oom": False} | common | fields
    if set(row) != set(_MEM_KEYS):
        raise KeyError(f"unknown memory fields {sorted(set(row) - set(_MEM_KEYS))}")
    return row


# Narayanan et al. count FLOPs with activation recomputation included (4 passes over the GEMMs).
_NARAYANAN_FLOPS = (
    "Eq. 3: F = 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) FLOPs per iteration, GEMMs only, including the extra "
    "forward pass of activation recomputation; per-GPU = F / (iteration time * n); end-to-end time (data "
    "loading, optimizer, communication, logging). % of peak uses 312 TFLOP/s (A100 16-bit)."
)
_SELENE = {
    "hardware": "A100-80GB (DGX A100, Selene)",
    "interconnect": "NVLink/NVSwitch in node; 8x Mellanox HDR 200 Gb/s InfiniBand HCAs per node; 3-level fat tree",
    "precision": "mixed precision (16-bit)",
}
_NARAYANAN = _SELENE | {
    "url": "https://arxiv.org/abs/2104.04473", "vocab_size": 51200, "seq_len": 2048, "model_name": "GPT",
    "sequence_parallel": False, "peak_tflops_per_gpu": 312, "flops_counting": _NARAYANAN_FLOPS,
}
_NAR_T1 = _NARAYANAN | {
    "source": "Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters Using "
    "Megatron-LM (SC '21), Table 1",
    # Section 5.1: interleaved schedule with scatter/gather; chunks per GPU not stated. Eq. 3 assumes recompute.
    "pipeline_schedule": "interleaved 1F1B", "recompute": "full",
}
_NAR_T2 = _NARAYANAN | {
    "source": "Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters Using "
    "Megatron-LM (SC '21), Table 2 (PTD-P vs ZeRO-3 without model parallelism)",
}
_K_T1 = ("id", "n_params", "n_heads", "d_model", "n_layers", "tp", "pp", "dp", "gpus", "global_batch_size",
         "achieved_tflops_per_gpu", "pct_of_peak", "aggregate_pflops")
_K_T2 = ("id", "n_params", "n_layers", "d_model", "n_heads", "tp", "pp", "dp", "gpus", "zero_stage",
         "micro_batch_size", "global_batch_size", "achieved_tflops_per_gpu", "notes")
_GPT3 = (174.6e9, 96, 12288, 96)  # Table 2 count; shape from Section 5.3.2
_GPT530 = (529.6e9, 105, 20480, 128)  # Table 1 shape
_DAYS = "Table 2 training time for 300B tokens: {} days"

PUBLISHED_RUNS: list[Row] = [
    # dp = gpus / (tp * pp) on every Table 1 row (the table prints model-parallel sizes and GPU counts).
    *_rows(_NAR_T1, _K_T1, [
        ("nar21-t1-1.7b", 1.7e9, 24, 2304, 24, 1, 1, 32, 32, 512, 137, 0.44, 4.4),
        ("nar21-t1-3.6b", 3.6e9, 32, 3072, 30, 2, 1, 32, 64, 512, 138, 0.44, 8.8),
        ("nar21-t1-7.5b", 7.5e9, 32, 4096, 36, 4, 1, 32, 128, 512, 142, 0.46, 18.2),
        ("nar21-t1-18b", 18.4e9, 48, 6144, 40, 8, 1, 32, 256, 1024, 135, 0.43, 34.6),
        ("nar21-t1-39b", 39.1e9, 64, 8192, 48, 8, 2, 32, 512, 1536, 138, 0.44, 70.8),
        ("nar21-t1-76b", 76.1e9, 80, 10240, 60, 8, 4, 32, 1024, 1792, 140, 0.45, 143.8),
        ("nar21-t1-145b", 145.6e9, 96, 12288, 80, 8, 8, 24, 1536, 2304, 148, 0.47, 227.1),
        ("nar21-t1-310b", 310.1e9, 128, 16384, 96, 8, 16, 15, 1920, 2160, 155, 0.50, 297.4),
        ("nar21-t1-530b", 529.6e9, 128, 20480, 105, 8, 35, 9, 2520, 2520, 163, 0.52, 410.2),
        ("nar21-t1-1t", 1008.0e9, 160, 25600, 128, 8, 64, 6, 3072, 3072, 163, 0.52, 502.0),
    ]),
    # ZeRO-3 rows: model-parallel size 1, so tp = pp = 1 and dp = gpus; microbatch * gpus = global batch.
    # Table 2 does not state recompute or schedule for either scheme.
    *_rows(_NAR_T2, _K_T2, [
        ("nar21-t2-zero3-175b-384", *_GPT3, 1, 1, 384, 384, 3, 4, 1536, 144, _DAYS.format(90)),
        ("nar21-t2-zero3-175b-768", *_GPT3, 1, 1, 768, 768, 3, 2, 1536, 88, _DAYS.format(74)),
        ("nar21-t2-zero3-175b-1536", *_GPT3, 1, 1, 1536, 1536, 3, 1, 1536, 44, _DAYS.format(74)),
        ("nar21-t2-zero3-530b-640", *_GPT530, 1, 1, 640, 640, 3, 4, 2560, 138,
         "did not fit on 560 GPUs at microbatch 4, so 640 GPUs and batch 2560 (starred row); " + _DAYS.format(169)),
        ("nar21-t2-zero3-530b-1120", *_GPT530, 1, 1, 1120, 1120, 3, 2, 2240, 98, _DAYS.format(137)),
        ("nar21-t2-zero3-530b-2240", *_GPT530, 1, 1, 2240, 2240, 3, 1, 2240, 48, _DAYS.format(140)),
        # PTD-P 175B: the table prints model-parallel size 96 only; tp 8 (the paper's intra-node choice) and
        # pp 12 are inferred, dp = gpus / 96.
        ("nar21-t2-ptdp-175b-384", *_GPT3, 8, 12, 4, 384, None, 1, 1536, 153, _DAYS.format(84)),
        ("nar21-t2-ptdp-175b-768", *_GPT3, 8, 12, 8, 768, None, 1, 1536, 149, _DAYS.format(43)),
        ("nar21-t2-ptdp-175b-1536", *_GPT3, 8, 12, 16, 1536, None, 1, 1536, 141, _DAYS.format(23)),
        # PTD-P 530B: model-parallel size 280 = the Table 1 530B layout (tp 8, pp 35); dp = gpus / 280.
        ("nar21-t2-ptdp-530b-560", *_GPT530, 8, 35, 2, 560, None, 1, 2240, 171, _DAYS.format(156)),
        ("nar21-t2-ptdp-530b-1120", *_GPT530, 8, 35, 4, 1120, None, 1, 2240, 167, _DAYS.format(80)),
        ("nar21-t2-ptdp-530b-2240", *_GPT530, 8, 35, 8, 2240, None, 1, 2240, 159, _DAYS.format(42)),
    ]),
]

# Korthikanti et al.: MFU excludes recompute, HFU includes it; Table 3 runs use no data parallelism.
_KORTHIKANTI = _SELENE | {
    "source": "Korthikanti et al. 2022, Reducing Activation Recomputation in Large Transformer Models "
    "(MLSys 2023), Table 3 (configs) and Table 5 (end-to-end iteration time)",
    "url": "https://arxiv.org/abs/2205.05198", "model_name": "GPT", "vocab_size": 51200, "seq_len": 2048,
    "flops_counting": "Appendix A: model FLOPs = 72*B*L*s*h^2*(1 + s/(6h) + v/(12*h*L)) per iteration (no "
    "recompute); hardware FLOPs = 72*B*L*s*h^2*(1 + s/(3h) + v/(12*h*L)) (adds the selectively recomputed "
    "attention); MFU/HFU = FLOPs / (iteration time * peak), after Chowdhery et al. Peak is given in a footnote "
    "not reproduced here; 312 TFLOP/s reproduces the printed MFU within 0.2 points. No MFU/HFU is printed for "
    "the full-recompute baseline.",
}
_K_KOR = ("id", "n_params", "n_heads", "d_model", "n_layers", "tp", "pp", "dp", "gpus", "global_batch_size",
          "micro_batch_size", "interleaved_stages", "sequence_parallel", "recompute", "step_time_s", "mfu", "hfu",
          "notes")
_K22 = (22e9, 64, 6144, 48, 8, 1, 1, 8, 4, 4, None)  # Table 3; interleaving is used for 175B and 530B only
_K175 = (175e9, 96, 12288, 96, 8, 8, 1, 64, 64, 1, 3)
_K530 = (530e9, 128, 20480, 105, 8, 35, 1, 280, 280, 1, 3)
_K1T = (1e12, 160, 25600, 128, 8, 64, 1, 512, 512, 1, None)
_GAIN = "Table 5 throughput increase over full recompute: {}"

PUBLISHED_RUNS += _rows(_KORTHIKANTI, _K_KOR, [
    # "Full Recompute" is full activation recomputation without sequence parallelism (Section 6.3).
    ("kor22-22b-full", *_K22, False, "full", 1.42, None, None, None),
    ("kor22-22b-sp-sel", *_K22, True, "selective", 1.10, 0.415, 0.437, _GAIN.format("29.0%")),
    ("kor22-175b-full", *_K175, False, "full", 18.13, None, None, None),
    ("kor22-175b-sp-sel", *_K175, True, "selective", 13.75, 0.514, 0.528, _GAIN.format("31.8%")),
    ("kor22-530b-full", *_K530, False, "full", 49.05, None, None, None),
    ("kor22-530b-sp-sel", *_K530, True, "selective", 37.83, 0.560, 0.570, _GAIN.format("29.7%")),
    ("kor22-1t-full", *_K1T, False, "full", 94.42, None, None, None),
    ("kor22-1t-sp-sel", *_K1T, True, "selective", 71.49, 0.563, 0.570, _GAIN.format("32.1%")),
    # Section 6.3 text: 530B scaled to 8-way data parallelism, batch per model instance kept constant.
    ("kor22-530b-sp-sel-dp8", 530e9, 128, 20480, 105, 8, 35, 8, 2240, 2240, 1, 3, True, "selective", 39.15, 0.542,
     None, "text of Section 6.3; no overlap of the gradient all-reduce with back-propagation"),
])

_LLAMA3 = {
    "source": "Dubey et al. (Llama Team, AI @ Meta) 2024, The Llama 3 Herd of Models, Table 4 (shape: Table 3)",
    "url": "https://arxiv.org/abs/2407.21783", "model_name": "Llama 3 405B", "n_layers": 126, "d_model": 16384,
    "n_heads": 128, "n_kv_heads": 8, "vocab_size": 128000, "ffn_hidden": 53248, "n_params": 405e9,
    "hardware": "H100-80GB HBM3, 700 W (Grand Teton)",
    "interconnect": "NVLink in 8-GPU server; RoCE 400 Gb/s per GPU, 3-layer Clos, 3072-GPU pods at full bisection, "
    "1:7 oversubscribed between pods",
    "precision": "bf16", "pipeline_schedule": "interleaved (Llama 3 variant)",
    # Section 3.3.2: FSDP shards optimizer states and gradients, and does not reshard parameters after the
    # forward pass, so full stage parameters stay resident through backward: closest ZeRO stage is 2 (inferred).
    "zero_stage": 2,
    "flops_counting": "BF16 MFU as defined by Chowdhery et al. (PaLM); the paper prints neither the FLOP formula "
    "nor the peak (430 TFLOP/s at 43% implies about 1000 TFLOP/s dense BF16).",
}
_K_LLAMA = ("id", "gpus", "tp", "cp", "pp", "dp", "seq_len", "global_batch_size", "recompute",
            "achieved_tflops_per_gpu", "mfu", "notes")
# global_batch_size = printed "batch size/DP" * DP (inferred); 8K rows ran without activation checkpointing.
PUBLISHED_RUNS += _rows(_LLAMA3, _K_LLAMA, [
    ("llama3-405b-8k-8192gpu", 8192, 8, 1, 16, 64, 8192, 32 * 64, "none", 430, 0.43, "16M tokens/batch"),
    ("llama3-405b-8k-16384gpu", 16384, 8, 1, 16, 128, 8192, 16 * 128, "none", 400, 0.41, "16M tokens/batch"),
    # Table 4 prints DP = 4 here, but 8*16*16*4 = 8192 != 16,384 GPUs and 16 * 4 * 131072 = 8.4M != 16M tokens;
    # dp = 16384 / (8*16*16) = 8 agrees with both, so 8 is used.
    ("llama3-405b-128k-16384gpu", 16384, 8, 16, 16, 8, 131072, 16 * 8, None, 380, 0.38,
     "Table 4 prints DP=4 (inconsistent with its GPU and token counts); 16M tokens/batch"),
])

PUBLISHED_RUNS += _rows({
    "source": "Zhang et al. 2022, OPT: Open Pre-trained Transformer Language Models, Section 2.4 (shape and "
    "batch: Table 1); tensor-parallel degree from the metaseq OPT-175B logbook, 10% update",
    "url": "https://arxiv.org/abs/2205.01068", "model_name": "OPT-175B", "n_layers": 96, "n_heads": 96,
    "d_model": 12288, "seq_len": 2048, "n_params": 175e9, "gpus": 992, "hardware": "A100-80GB",
    "precision": "fp16 weights, fp32 Adam state sharded across hosts, dynamic loss scaling",
    "flops_counting": "not stated ('utilization of up to 147 TFLOP/s per GPU')",
}, ("id", "tp", "pp", "dp", "zero_stage", "global_batch_size", "achieved_tflops_per_gpu", "notes"), [
    # tp 8 from the logbook ("8x Tensor Parallelism"); pp 1 and dp = 992 / 8 = 124 inferred (no PP mentioned);
    # zero_stage 3 inferred from Fully Sharded Data Parallel; batch 2M tokens / 2048 = 1024 sequences.
    ("opt-175b", 8, 1, 124, 3, 1024, 147, "'up to' 147 TFLOP/s; vocabulary: GPT-2 BPE (size not printed)"),
])

_BLOOM_FLOPS = (
    "Megatron-DeepSpeed log 'TFLOPs' = Narayanan Eq. 3 with activation recomputation (bigscience "
    "Megatron-DeepSpeed PR 251; the README calls these hardware TFLOPs). Checked: Eq. 3 with l=70, h=14336, "
    "V=250680, s=2048, B=2048 over 104.70 s on 384 GPUs gives 149.8 TFLOP/s."
)
_JEAN_ZAY = {
    "hardware": "A100-80GB (Jean Zay, 8 GPUs per node)",
    "interconnect": "NVLink (4 inter-GPU links) in node; 4 Omni-Path links per node between nodes",
}
PUBLISHED_RUNS += _rows(_JEAN_ZAY | {
    "source": "BigScience 2022, BLOOM-176B training README (bigscience-workshop/bigscience, "
    "train/tr11-176B-ml/README.md: 'Replica setup', 'Important checkpoints', 'Global batch size')",
    "url": "https://github.com/bigscience-workshop/bigscience/blob/master/train/tr11-176B-ml/README.md",
    "model_name": "BLOOM-176B", "n_layers": 70, "d_model": 14336, "n_heads": 112, "vocab_size": 250680,
    "seq_len": 2048, "n_params": 176e9, "tp": 4, "pp": 12, "dp": 8, "gpus": 384, "zero_stage": 1,
    # The HF blog 'The Technology Behind BLOOM' says sequence parallelism was not used; the slurm script
    # passes --checkpoint-activations and --bf16.
    "sequence_parallel": False, "recompute": "full", "precision": "bf16", "pipeline_schedule": "DeepSpeed 1F1B",
    "flops_counting": _BLOOM_FLOPS,
}, ("id", "micro_batch_size", "global_batch_size", "step_time_s", "achieved_tflops_per_gpu", "notes"), [
    ("bloom-176b-gbs2048", 2, 2048, 104.70, 149.77, "log line at iteration 85376 (end of epoch 1); 19.561 samples/s"),
    # Batch ramp-up start: one microbatch per replica for 12 stages. Eq. 3 reproduces 8.04 with 384 GPUs.
    ("bloom-176b-gbs16", 2, 16, 15.23, 8.04, "log line at iteration 3707; 1.051 samples/s"),
    ("bloom-176b-gbs192", 1, 192, None, 73, "text: the run started at GBS=192/MBS=1 at 73 TFLOPs"),
])

# Layout sweep of one 181B shape on all 384 GPUs, same day (2022-02-25), fp16 (the BF16 optimizer came later).
_K_BP = ("id", "dp", "tp", "pp", "micro_batch_size", "global_batch_size", "step_time_s", "achieved_tflops_per_gpu",
         "measured_max_memory_gb")
_BLOOM_SWEEP: list[tuple[Any, ...]] = [
    ("bloom-pre-dp8-tp8-pp6-mbs4-gbs1568", 8, 8, 6, 4, 1568, 113.01, 109.22, 56),
    ("bloom-pre-dp8-tp8-pp6-mbs4", 8, 8, 6, 4, 2048, 114.11, 141.27, 55),
    ("bloom-pre-dp8-tp8-pp6-mbs6", 8, 8, 6, 6, 2016, 123.57, 128.43, 66),
    ("bloom-pre-dp4-tp8-pp12-mbs4-gbs1568", 4, 8, 12, 4, 1568, 92.75, 133.08, None),
    ("bloom-pre-dp4-tp8-pp12-mbs4", 4, 8, 12, 4, 2048, 117.07, 137.70, 49),
    ("bloom-pre-dp4-tp8-pp12-mbs2-gbs1568", 4, 8, 12, 2, 1568, 99.93, 123.51, None),
    ("bloom-pre-dp4-tp8-pp12-mbs2", 4, 8, 12, 2, 2048, 128.82, 125.15, None),
    ("bloom-pre-dp6-tp8-pp8-mbs4", 6, 8, 8, 4, 2016, 113.16, 140.24, 52),
    ("bloom-pre-dp12-tp8-pp4-mbs2", 12, 8, 4, 2, 2016, 125.52, 126.43, 53),
    ("bloom-pre-dp12-tp8-pp4-mbs4", 12, 8, 4, 4, 2016, 114.81, 138.22, 59),
    ("bloom-pre-dp24-tp8-pp2-mbs1", 24, 8, 2, 1, 2016, 145.45, 109.11, 65),
    ("bloom-pre-dp24-tp8-pp2-mbs2", 24, 8, 2, 2, 2016, 136.13, 116.58, 76),
    ("bloom-pre-dp8-tp4-pp12-mbs4", 8, 4, 12, 4, 2048, 111.89, 144.08, 60),
    # The table repeats dp8/tp4/pp12/mbs2 with 113.54 s and 38GB; the first entry is kept.
    ("bloom-pre-dp8-tp4-pp12-mbs2", 8, 4, 12, 2, 2048, 110.48, 145.92, 44),
    ("bloom-pre-dp16-tp4-pp6-mbs4", 16, 4, 6, 4, 2048, 117.11, 137.66, 75),
    ("bloom-pre-dp16-tp4-pp6-mbs2", 16, 4, 6, 2, 2048, 111.71, 144.31, 57),
    ("bloom-pre-dp16-tp2-pp12-mbs2", 16, 2, 12, 2, 2048, 112.50, 143.30, 63),
    ("bloom-pre-dp8-tp2-pp24-mbs1", 8, 2, 24, 1, 2048, 119.53, 134.88, 44),
    ("bloom-pre-dp8-tp2-pp24-mbs2", 8, 2, 24, 2, 2048, 122.75, 131.33, 53),
    ("bloom-pre-dp4-tp4-pp24-mbs1", 4, 4, 24, 1, 2048, 130.60, 123.44, None),
]
_BLOOM_PRE = _JEAN_ZAY | {
    "source": "BigScience 2022, tr11-176B-ml chronicles-prequel.md, 'GBS Variations' tables (2022-02-25)",
    "url": "https://github.com/bigscience-workshop/bigscience/blob/master/train/tr11-176B-ml/chronicles-prequel.md",
    "model_name": "BLOOM candidate 181B", "n_layers": 72, "d_model": 14336, "n_heads": 64,
    # Vocabulary: '250k' on the prequel's model lines; Eq. 3 with V=250000 reproduces the printed TFLOPs.
    "vocab_size": 250000, "seq_len": 2048, "n_params": 181e9, "gpus": 384, "zero_stage": 1,
    "sequence_parallel": False, "precision": "fp16 (mixed)", "pipeline_schedule": "DeepSpeed 1F1B",
    "flops_counting": "as BLOOM-176B (Eq. 3 with recompute, after the prequel's 'TFLOPs calculation improved' "
    "fix). Checked: dp8/tp4/pp12/mbs4 gives 144.07 vs 144.08 printed. Recompute is not stated in these tables.",
    "notes": "Mem column: max GPU memory on the first/last nodes (definition printed under the prequel's "
    "'Best TFLOPs' tables; tool not stated)",
}
PUBLISHED_RUNS += _rows(_BLOOM_PRE, _K_BP, _BLOOM_SWEEP)

# Megatron-LM README of Sept 2020: tensor (intra-layer) model parallelism only in that release, so MP = tp.
_MEG20 = {
    "source": "NVIDIA Megatron-LM README, Sept 2020 (commit 5281919420), model- and data-parallel scaling "
    "tables (rendered from images/tables.tex)",
    "url": "https://github.com/NVIDIA/Megatron-LM/blob/5281919420ac4eb649e6aee9652ff39bb94d462a/images/tables.tex",
    "model_name": "GPT-2 style", "vocab_size": 51200, "seq_len": 1024, "pp": 1, "sequence_parallel": False,
    "precision": "mixed precision",
    "flops_counting": "not stated; the values match Narayanan Eq. 3 with V=51200, s=1024 (1B case: "
    "1.612e14 FLOPs per iteration / 1.076 s = 149.8 TFLOP/s)",
}
_K_MEG = ("id", "n_params", "d_model", "n_heads", "n_layers", "tp", "dp", "gpus", "global_batch_size", "hardware",
          "step_time_s", "achieved_tflops_per_gpu")
# (params, hidden, heads, layers, model-parallel size) per case 1B/2B/4B/8B.
_M1, _M2 = (1.16e9, 1920, 15, 24, 1), (2.03e9, 2304, 18, 30, 2)
_M4, _M8 = (4.24e9, 3072, 24, 36, 4), (8.67e9, 4096, 32, 42, 8)
_V100, _A100 = "V100 (DGX-2)", "A100 (DGX-A100; memory size not stated)"
PUBLISHED_RUNS += _rows(_MEG20, _K_MEG, [
    ("meg20-v100-1b", *_M1, 1, 1, 8, _V100, 1.121, 71.9),
    ("meg20-v100-2b", *_M2, 1, 2, 8, _V100, 1.093, 64.2),
    ("meg20-v100-4b", *_M4, 1, 4, 8, _V100, 1.238, 58.5),
    ("meg20-v100-8b", *_M8, 1, 8, 8, _V100, 1.407, 52.2),
    ("meg20-a100-1b", *_M1, 1, 1, 16, _A100, 1.076, 149.8),
    ("meg20-a100-2b", *_M2, 1, 2, 16, _A100, 1.026, 136.8),
    ("meg20-a100-4b", *_M4, 1, 4, 16, _A100, 1.162, 124.7),
    ("meg20-a100-8b", *_M8, 1, 8, 16, _A100, 1.343, 109.3),
    # 128-way data parallelism; dp = gpus / tp.
    ("meg20-a100-1b-dp128", *_M1, 128, 128, 2048, _A100, 1.153, 139.8),
    ("meg20-a100-2b-dp128", *_M2, 128, 256, 2048, _A100, 1.101, 127.5),
    ("meg20-a100-4b-dp128", *_M4, 128, 512, 2048, _A100, 1.242, 116.7),
    ("meg20-a100-8b-dp128", *_M8, 128, 1024, 2048, _A100, 1.380, 106.5),
])

# (faster, slower, ratio of per-GPU throughput): same model shape and machine type, different layout.
LAYOUT_CONTRASTS: list[tuple[str, str, float]] = [
    ("nar21-t2-ptdp-175b-1536", "nar21-t2-zero3-175b-1536", 141 / 44),
    ("nar21-t2-ptdp-175b-768", "nar21-t2-zero3-175b-768", 149 / 88),
    ("nar21-t2-ptdp-530b-2240", "nar21-t2-zero3-530b-2240", 159 / 48),
    ("nar21-t2-ptdp-530b-1120", "nar21-t2-zero3-530b-1120", 167 / 98),
    ("nar21-t2-zero3-175b-384", "nar21-t2-zero3-175b-1536", 144 / 44),
    ("nar21-t2-zero3-530b-640", "nar21-t2-zero3-530b-2240", 138 / 48),
    ("bloom-176b-gbs2048", "bloom-176b-gbs16", 149.77 / 8.04),
    ("bloom-176b-gbs2048", "bloom-176b-gbs192", 149.77 / 73),
]

_ZERO = {
    "source": "Rajbhandari et al. 2020, ZeRO: Memory Optimizations Toward Training Trillion Parameter Models "
    "(SC '20), Table 1 and Section 5",
    "url": "https://arxiv.org/abs/1910.02054", "precision": "mixed fp16 with fp32 Adam states (K = 12)",
    "quantity": "model-state memory per GPU: fp16 params + fp16 grads + K*params optimizer bytes, sharded per "
    "ZeRO stage (1: Pos, 2: Pos+g, 3: Pos+g+p)",
    "unit": "GB (1e9 bytes; 7.5B * 16 bytes = 120 GB)", "kind": "analytical", "tp": 1, "pp": 1,
}
# (label, params, DP degree, Pos, Pos+g, Pos+g+p) from Table 1; Section 5 text repeats the 7.5B / 64-GPU column.
_ZERO_T1: list[tuple[str, float, int, float, float, float]] = [
    ("7.5B", 7.5e9, 1, 120, 120, 120), ("7.5B", 7.5e9, 4, 52.5, 41.3, 30), ("7.5B", 7.5e9, 16, 35.6, 21.6, 7.5),
    ("7.5B", 7.5e9, 64, 31.4, 16.6, 1.88), ("7.5B", 7.5e9, 256, 30.4, 15.4, 0.47),
    ("7.5B", 7.5e9, 1024, 30.1, 15.1, 0.12),
    ("128B", 128e9, 1, 2048, 2048, 2048), ("128B", 128e9, 4, 896, 704, 512), ("128B", 128e9, 16, 608, 368, 128),
    ("128B", 128e9, 64, 536, 284, 32), ("128B", 128e9, 256, 518, 263, 8), ("128B", 128e9, 1024, 513, 257, 2),
    ("1T", 1e12, 1, 16000, 16000, 16000), ("1T", 1e12, 4, 7000, 5500, 4000), ("1T", 1e12, 16, 4750, 2875, 1000),
    ("1T", 1e12, 64, 4187, 2218, 250), ("1T", 1e12, 256, 4046, 2054, 62.5), ("1T", 1e12, 1024, 4011, 2013, 15.6),
]
_KOR_MEM = {
    "source": "Korthikanti et al. 2022, Reducing Activation Recomputation in Large Transformer Models, Section 5 "
    "and Appendix B",
    "url": "https://arxiv.org/abs/2205.05198", "seq_len": 2048, "vocab_size": 51200, "kind": "analytical",
    "precision": "16-bit activations, 1-byte dropout masks",
    "notes": "Table 2, bytes per layer: none sbh(34+5as/h); TP sbh(10+24/t+5as/(ht)); TP+SP sbh(34/t+5as/(ht)); "
    "TP+selective sbh(10+24/t); TP+SP+selective 34sbh/t; full recompute 2sbh. Eq. 5: 1F1B first stage holds L "
    "layers' worth, (sbhL/t)(34+5as/h); interleaving multiplies by (1 + (p-1)/(p*m)).",
}
_BLOOM_MEM = _JEAN_ZAY | {
    "url": "https://github.com/bigscience-workshop/bigscience/blob/master/train/tr11-176B-ml/chronicles-prequel.md",
    "quantity": "max GPU memory used on the first/last nodes (those holding the word embedding)", "unit": "GB",
    "kind": "measured", "seq_len": 2048, "vocab_size": 250000, "zero_stage": 1, "micro_batch_size": 1,
    "global_batch_size": 2048, "d_model": 14400,
}
_BEST = "BigScience 2022, tr11-176B-ml chronicles-prequel.md, 'Best TFLOPs' tables ({})"

PUBLISHED_MEMORY: list[Row] = [
    *(_mem(_ZERO, model_name=f"{label} (ZeRO Table 1)", n_params=psi, dp=dp, gpus=dp, zero_stage=stage, value=gb)
      for label, psi, dp, *per_stage in _ZERO_T1 for stage, gb in enumerate(per_stage, start=1)),
    _mem(_ZERO, model_name="GPT-2 1.5B", n_params=1.5e9, seq_len=1024, micro_batch_size=32, recompute="none", tp=None,
         pp=None, quantity="activation memory", value=60, unit="GB (about)",
         notes="Section 3.2; footnote 3: activations about 12 * hidden * batch * seq * layers for GPT-2-like models"),
    _mem(_ZERO, model_name="GPT-2 1.5B", n_params=1.5e9, seq_len=1024, micro_batch_size=32, recompute="full", tp=None,
         pp=None, quantity="activation memory with activation checkpointing", value=8, unit="GB (about)", notes="Section 3.2"),
    _mem(_ZERO, model_name="GPT-like 100B", n_params=100e9, micro_batch_size=32, recompute="full", tp=None, pp=None,
         quantity="activation memory with activation checkpointing", value=60, unit="GB (around)",
         notes="Section 3.2; sequence length not stated"),
    _mem(_KOR_MEM, model_name="MT-NLG 530B (Table 3 config)", n_params=530e9, n_layers=105, d_model=20480,
         n_heads=128, tp=8, pp=35, dp=1, gpus=280, micro_batch_size=1, global_batch_size=280, sequence_parallel=True,
         recompute="selective", quantity="first-stage memory saved by freeing each microbatch's pipeline output "
         "after its forward pass (s*b*h*p * 2 bytes)", value=2.73, unit="GB as printed (= GiB: 2.94e9 bytes)"),
    _mem(_KOR_MEM, model_name="GPT-3 175B", n_params=175e9, n_layers=96, d_model=12288, n_heads=96,
         quantity="fraction of activation memory saved by selective recomputation (5as/h = 80 vs 34)", value=0.70,
         unit="fraction", notes="Section 5; recompute FLOPs overhead 2.7%. " + _KOR_MEM["notes"]),
    _mem(_KOR_MEM, model_name="MT-NLG 530B", n_params=530e9, n_layers=105, d_model=20480, n_heads=128,
         quantity="fraction of activation memory saved by selective recomputation (5as/h = 64 vs 34)", value=0.65,
         unit="fraction", notes="Section 5; recompute FLOPs overhead 1.6%. " + _KOR_MEM["notes"]),
    # ZeRO-1 shards over DP, so the same 200B replica needs less memory per GPU at dp=2 (prequel text says so).
    *(_mem(_BLOOM_MEM, source=_BEST.format(prec), model_name=name, n_params=size, n_layers=layers, n_heads=heads,
           tp=8, pp=pp, dp=dp, gpus=gpus, precision=prec, value=gb)
      for prec, name, size, layers, heads, pp, dp, gpus, gb in (
          ("fp16", "20B", 20e9, 8, 32, 1, 1, 8, 67), ("fp16", "200B", 200e9, 80, 96, 10, 1, 80, 73),
          ("fp16", "200B", 200e9, 80, 96, 10, 2, 160, 51), ("bf16", "20B", 20e9, 8, 32, 1, 1, 8, 68),
          ("bf16", "200B", 200e9, 80, 96, 10, 1, 80, 75), ("bf16", "200B", 200e9, 80, 96, 10, 2, 160, 53))),
    *(_mem(_BLOOM_MEM, source=_BLOOM_PRE["source"], model_name=_BLOOM_PRE["model_name"], n_params=181e9,
           n_layers=72, d_model=14336, n_heads=64, gpus=384, dp=dp, tp=tp, pp=pp, micro_batch_size=mbs,
           global_batch_size=gbs, precision="fp16 (mixed)", value=gb, notes=f"run row {rid}")
      for rid, dp, tp, pp, mbs, gbs, _, _, gb in _BLOOM_SWEEP if gb is not None),
    *(_mem(_BLOOM_MEM, source=_BLOOM_PRE["source"], model_name=_BLOOM_PRE["model_name"], n_params=181e9,
           n_layers=72, d_model=14336, n_heads=64, gpus=384, dp=dp, tp=tp, pp=pp, micro_batch_size=mbs,
           global_batch_size=gbs, precision="fp16 (mixed)", oom=True, unit=None)
      for dp, tp, pp, mbs, gbs in ((48, 8, 1, 1, 2016), (32, 2, 6, 2, 2048), (32, 2, 6, 1, 2048))),
]

# ZeRO Table 2: largest model that trained on 32GB V100s with 64-way DP times MP (tp); measured, billions of params.
PUBLISHED_MEMORY += [
    _mem(_ZERO, source=_ZERO["source"].replace("Table 1 and Section 5", "Table 2"), tp=mp, dp=64, gpus=64 * mp,
         zero_stage=stage, hardware="V100-32GB", kind="measured", quantity="largest model size that trained",
         value=size, unit="billion parameters",
         notes="Table 2 'Measured Model Size' (hardware: the 32GB V100 cluster of Table 1's caption); the Pos "
         "theoretical maxima it matches are 7.6/15.2/30.4/60.8/121.6B; the MP=8 baseline 10B is italic in the table")
    for mp, baseline, pos in ((1, 1.3, 6.2), (2, 2.5, 12.5), (4, 5, 25), (8, 10, 50), (16, 20, 100))
    for stage, size in ((None, baseline), (1, pos))
]
