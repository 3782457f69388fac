"""The config schema: one dataclass per section, each key with its default and a comment.

Loading (YAML + overrides) is config/load.py, cross-field checks config/checks.py.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
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
    # mixture-of-experts (docs/moe.md): the same ranks of each pipeline stage factored a second way,
    # etp x ep x edp == tp x cp x dp; ep ranks hold different experts (edp is derived)
    ep: int = 1
    etp: int = 1  # expert tensor parallelism: only 1 (nemo's experts take a 1-D ep mesh)


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
    # end after this step while the LR schedule still spans max_steps: the first steps of the full recipe,
    # bit for bit (a short CI gate, a time-limited job resumed later); None: run to max_steps
    stop_at_step: int | None = None
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
    # torch.compile each decoder layer (nemo-automodel's per-layer compile, after FSDP2/TP/AC; under MIMO the LLM's
    # and the vision tower's layers); None: on when training an LM on CUDA, unless config/compile.py says it cannot
    # work (an MoE model's split or fp32 experts); off for MIMO (measured no faster). Fuses the elementwise work
    # between matmuls (norms, RoPE, SwiGLU, residuals)
    compile: bool | None = None
    # AdamW as one fused kernel over all tensors (no foreach temporaries); None: on when training on CUDA. A fused
    # optimizer also takes the step-skip decision on the device (found_inf), so the vote costs no host sync
    fused_optimizer: bool | None = None

    @property
    def last_step(self) -> int:
        """The step this run ends at: train.stop_at_step, else train.max_steps."""
        return self.stop_at_step or self.max_steps


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
    """Encoder + projector + LLM, each on its own grid of the same ranks (docs/mimo.md). Empty layout: no MIMO.
    model.pretrained, if set, is a transformers LLaVA folder holding all three (mimo/llava.py)."""

    layout: dict = field(default_factory=dict)  # <module>: {dp, tp, cp, pp}; modules: encoder_name and language
    encoder_name: str = "vision"
    encoder: dict = field(default_factory=dict)  # {pretrained: path} or HF vision config kwargs incl. model_type
    # the image features, as LLaVA selects them: the tower's hidden states after this layer (-1: the last, before any
    # post-layernorm), all rows (full) or without the first, CLS, row (default). A LLaVA model.pretrained brings its
    # own (a list of layers there is concatenated, as LLaVA does)
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
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
    def language_ep(self) -> int:
        """Ranks the language model's routed experts are split over: parallel.ep, or mimo.layout.language.ep."""
        return int(self.mimo.layout.get("language", {}).get("ep", 1)) if self.mimo.layout else self.parallel.ep

    @property
    def layout(self) -> str:
        """The layout as printed and recorded: `dp=2 tp=1 cp=1 pp=1`, or per MIMO module
        `vision: dp=2 tp=1 cp=1 pp=1, language: dp=1 tp=2 cp=1 pp=1` (non-colocated: `... pp=1 offset=2`; an MoE
        language model's experts: `... ep=2`)."""
        if self.mimo.layout:
            return ", ".join(f"{name}: " + " ".join(f"{d}={sizes.get(d, 1)}" for d in ("dp", "tp", "cp", "pp"))
                             + (f" offset={sizes['offset']}" if sizes.get("offset") else "")
                             + (f" ep={sizes['ep']}" if sizes.get("ep", 1) > 1 else "")
                             for name, sizes in self.mimo.layout.items())
        p = self.parallel
        experts = f" ep={p.ep}" if p.ep > 1 else ""  # the expert view of the same ranks (docs/moe.md)
        return f"dp={p.dp} tp={p.tp} cp={p.cp} pp={p.pp}{experts}"
