"""The one-line bugs of scripts/mutation_check.py, each with the tests that should catch it."""

from __future__ import annotations

from dataclasses import dataclass


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
