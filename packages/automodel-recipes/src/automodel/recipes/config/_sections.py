"""Typed configuration sections: one pydantic model per YAML section, unknown keys rejected."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from automodel.recipes.config._component import Component

RecipeName = Literal["sft", "pretrain", "distill", "vlm_sft", "classification", "benchmark"]


class Section(BaseModel):
    """Base of every config section: keyword-only, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSection(Section):
    """Which model to train and how to build it."""

    name_or_path: str
    """A local HF folder or hub id (hub needs network)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. bfloat16 halves memory and speeds up GPU matmuls; keep float32 on CPU.
    ``auto``: bfloat16 on a GPU, float32 on CPU (the same file runs well on both)."""
    from_scratch: bool = False
    """Build from config.json with random weights (pretraining) instead of loading weights."""
    attn_implementation: str | None = None
    """'sdpa' (default), 'eager', 'flash_attention_2', 'flex_attention'..."""
    trust_remote_code: bool = False
    num_labels: int | None = None
    """Sequence classification: number of classes (default: from the model config)."""
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    """Keys set on the model config before building (e.g. {num_hidden_layers: 2})."""


class TokenizerSection(Section):
    """Tokenizer (or processor) location and chat template."""

    name_or_path: str | None = None
    """Defaults to model.name_or_path."""
    chat_template: str | None = None
    """A Jinja chat template (inline or a .jinja file path) replacing the tokenizer's own."""


class DataSource(Section):
    """One split of data: a local file (JSON/JSONL/Parquet/TXT), a folder of them, or `hf:name`."""

    path: str
    split: str = "train"
    limit: int | None = None
    """Keep only the first N examples (quick experiments)."""


class DataSection(Section):
    """How examples are read, rendered, tokenized, truncated and packed."""

    format: Literal["chat", "instruction", "text", "classification", "vlm_chat"] = "chat"
    train: DataSource | None = None
    validation: DataSource | None = None
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_column: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    images_column: str = "images"
    max_length: int = Field(default=512, gt=0)
    """Longer sequences are handled per `truncation`. Memory grows linearly with it."""
    truncation: Literal["right", "drop", "error"] = "right"
    packing: bool = False
    """Concatenate examples into max_length rows with per-document attention (faster: no padding)."""
    on_bad_line: Literal["error", "skip"] = "error"
    """Malformed JSONL line or chat without assistant turn: stop with file:line, or skip and count."""
    shuffle: bool = True
    """Map-style data: a new permutation every epoch. Streaming: the file order per epoch."""
    streaming: bool = False
    """Pretraining text read lazily (JSONL/TXT/Parquet files or `hf:` streaming), packed on the
    fly, sharded by record across ranks; the stream position is checkpointed. For corpora that do
    not fit in memory; startup is instant whatever the corpus size."""
    dataset: Component | None = None
    """A custom dataset by `_target_`, called with its arguments plus tokenizer=..."""


class TrainingSection(Section):
    """The training loop: steps, batch, clipping, validation, logging cadence, output."""

    output_dir: str
    max_steps: int = Field(default=100, gt=0)
    micro_batch_size: int = Field(default=1, gt=0)
    """Sequences per forward per rank. Larger = faster until memory runs out."""
    grad_accum_steps: int = Field(default=1, gt=0)
    """Micro-batches per optimizer step: global batch = micro x accum x data-parallel size."""
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = Field(default=10, gt=0)
    val_every: int | None = None
    val_batches: int = Field(default=8, gt=0)
    on_nonfinite: Literal["skip", "stop"] = "stop"
    """A NaN/inf loss or gradient: skip that optimizer step, or stop with an error."""
    if_output_exists: Literal["refuse", "resume"] = "refuse"
    """output_dir already holds a finished run: refuse (default), or resume and train further."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True
    compile: bool = False
    """torch.compile the model: faster GPU steps after a one-time compile."""
    loss: Component | None = None
    """A custom loss by `_target_`: called as fn(logits, labels) -> summed loss."""
    sample_prompt: str | None = None
    """After training: a user message answered by the saved model, printed."""
    sample_max_new_tokens: int = 32


class OptimizerSection(Component):
    """Optimizer by `_target_` (default torch.optim.AdamW); other keys are its arguments."""

    target: str = Field(default="torch.optim.AdamW", alias="_target_")
    _skip_params: ClassVar[tuple[str, ...]] = ("params",)


class LRSchedulerSection(Section):
    """Learning-rate schedule: linear warmup, then cosine / linear / constant / WSD."""

    kind: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    decay_fraction: float = Field(default=0.2, gt=0.0, le=1.0)
    """WSD only: the final fraction of steps that decays to min_lr."""


class ParallelSection(Section):
    """Parallelism (passed to automodel.parallel): sizes of each mesh dimension."""

    dp_replicate: int = 1
    dp_shard: int = -1
    """-1 = all remaining ranks. FSDP: shards parameters/grads/optimizer state (saves memory)."""
    tp: int = 1
    """Tensor parallel: splits each matmul across GPUs of a node (for models too big per GPU)."""
    pp: int = 1
    """Pipeline parallel: not run by the recipes' loop yet (automodel.parallel.pipeline is)."""
    cp: int = 1
    """Context parallel: not run by the recipes' loop yet (automodel.parallel.context_parallel is)."""
    ep: int = 1
    """Expert parallel (MoE): spreads experts across ranks."""
    sequence_parallel: bool = False
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: saves memory, costs ~20-30% speed ('full')."""

    @model_validator(mode="after")
    def _loop_runs_it(self) -> ParallelSection:
        # The loop calls model(**batch) then backward: pipelining needs a schedule driving the
        # stages and context parallelism sharded sequences around forward and backward. Running
        # such a config would silently give an unpipelined / unsharded run: refuse it instead.
        for name, doc in (("pp", "pipeline"), ("cp", "context_parallel")):
            if getattr(self, name) != 1:
                raise ValueError(
                    f"parallel.{name}={getattr(self, name)}: the recipes' training loop does not "
                    f"run {name.upper()} yet; set parallel.{name}: 1 (use dp_shard/tp/ep), or drive "
                    f"automodel.parallel.{doc} from your own loop (automodel-parallel README)"
                )
        return self


class MoESection(Section):
    """Mixture-of-experts training (router losses, load-balance metrics); ignored by dense models."""

    aux_loss_coef: float | None = Field(default=None, ge=0.0)
    """Load-balancing loss weight; null = the model config's router_aux_loss_coef, 0 = off."""
    z_loss_coef: float = Field(default=0.0, ge=0.0)
    """Router z-loss weight (ST-MoE; 1e-3 is common); keeps router logits small. 0 = off."""
    log_balance: bool = True
    """Log tokens-per-expert imbalance (max/mean) and the router losses on log steps."""


class CheckpointSection(Section):
    """Training checkpoints (through automodel-ckpt) and resume."""

    enabled: bool = True
    every_steps: int | None = None
    """Save every N steps (and always at the end / on SIGTERM)."""
    keep_last: int = Field(default=2, gt=0)
    async_save: bool = False
    """Write checkpoints in the background: less stall per save on GPU."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest checkpoint in output_dir when there is one."""


class WandbSection(Section):
    project: str
    mode: Literal["online", "offline", "disabled"] = "offline"


class MlflowSection(Section):
    experiment: str
    tracking_uri: str | None = None


class LoggingSection(Section):
    """Where metrics go: console always, JSONL file, TensorBoard, W&B, MLflow."""

    jsonl: bool = True
    tensorboard: bool = False
    wandb: WandbSection | None = None
    mlflow: MlflowSection | None = None


class PeftSection(Section):
    """LoRA adapters (only adapters train; the saved output is a PEFT adapter folder)."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    quantize_base: Literal["nf4"] | None = None
    """QLoRA: the adapted base weights stored in 4-bit NF4 (bitsandbytes, one CUDA GPU, no FSDP):
    ~4x less weight memory, a little slower per step."""


class Fp8Section(Section):
    """FP8 matmuls through torchao (GPU of compute capability 8.9+: H100/H200): faster linears.

    Needs the ``automodel-kernels[fp8]`` extra (torchao); enabling it on a CPU is an error.
    """

    enabled: bool = False
    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"
    """torchao scaling: tensorwise is fastest; rowwise is more accurate for outlier-heavy layers."""
    filter_fqns: list[str] = Field(default_factory=lambda: ["lm_head"])
    """Linears whose name contains one of these stay in bf16 (lm_head: accuracy-sensitive)."""
    min_features: int = Field(default=1024, gt=0)
    """Smaller linears stay in bf16: the scaling overhead outweighs the FP8 gain below ~1024."""


class DistillSection(Section):
    """Knowledge distillation: teacher model, temperature, KD/CE mix."""

    teacher: str
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    temperature: float = Field(default=1.0, gt=0.0)
    kd_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    """loss = kd_weight * KL(teacher || student) + (1 - kd_weight) * CE."""


class BenchmarkSection(Section):
    """Synthetic-token benchmark: shape and measured windows."""

    seq_len: int = Field(default=512, gt=0)
    warmup_steps: int = Field(default=2, ge=0)
    window: int = Field(default=5, gt=0)
    """Steps per reported window."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s for MFU (default: 989 on H100/H200, none on CPU)."""


class RecipeConfig(Section):
    """A whole recipe file: which recipe runs, and every section it reads."""

    recipe: RecipeName
    model: ModelSection
    training: TrainingSection
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = Field(default_factory=LRSchedulerSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    peft: PeftSection | None = None
    fp8: Fp8Section = Field(default_factory=Fp8Section)
    moe: MoESection = Field(default_factory=MoESection)
    distill: DistillSection | None = None
    benchmark: BenchmarkSection = Field(default_factory=BenchmarkSection)

    @model_validator(mode="after")
    def _recipe_needs(self) -> RecipeConfig:
        if self.data.streaming and (self.recipe != "pretrain" or self.data.train is None):
            raise ValueError(
                "data.streaming: only the pretrain recipe streams, from data.train.path (files "
                "or hf:NAME); set data.streaming=false"
            )
        if self.recipe == "distill" and self.distill is None:
            raise ValueError("recipe 'distill' needs a 'distill' section with at least 'teacher'")
        if (
            self.recipe not in ("benchmark",)
            and self.data.train is None
            and self.data.dataset is None
        ):
            raise ValueError(
                f"recipe {self.recipe!r} needs data: set data.train.path (a JSONL/JSON/Parquet/"
                "TXT file) or data.dataset._target_"
            )
        return self
