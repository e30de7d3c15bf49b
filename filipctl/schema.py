"""The recipe schema: every option a recipe may set, its type, default and meaning.

This file is the single source of truth for recipe options; `filipctl recipe keys`
prints its documentation. Every model forbids unknown keys so a typo fails loudly.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# The vocabulary of CLIP's BPE tokenizer (models/tokenizer.py; a test compares it with open_clip's).
CLIP_VOCAB_SIZE = 49408


# Where MLflow can keep runs (filipctl.tracking.writer checks that the store answers before a run starts).
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "postgresql://", "mysql://", "mssql://", "databricks")

# A floating-point precision by name; models/precision.py maps each to its torch dtype.
Precision = Literal["fp32", "bf16", "fp16"]


class Section(BaseModel):
    # No inf/nan anywhere: a learning rate of .inf validates otherwise, and `recipe show --json` prints Infinity.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """`steps: true` is a typo, not 1 step: pydantic would take a bool for an int or a float."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and field.annotation in (int, float):
                    raise ValueError(f"{name}: expected a number, got {data[name]!r}")
        return data


class ImageTower(Section):
    """Vision Transformer (open_clip VisionTransformer) settings."""

    image_size: int = Field(224, gt=0, description="Input resolution in pixels (square).")
    patch_size: int = Field(32, gt=0, description="ViT patch size; image_size must be a multiple of it.")
    width: int = Field(768, gt=0, description="Transformer width.")
    layers: int = Field(12, gt=0, description="Number of transformer blocks.")
    heads: int = Field(12, gt=0, description="Attention heads; must divide width.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden size as a multiple of width.")

    @model_validator(mode="after")
    def _shapes(self) -> "ImageTower":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} does not divide width {self.width}")
        return self


class TextTower(Section):
    """Causal text Transformer (open_clip TextTransformer) over CLIP BPE tokens."""

    context_length: int = Field(77, gt=2, description="Tokens per caption including [BOS] and [EOS].")
    vocab_size: int = Field(
        CLIP_VOCAB_SIZE, gt=0,
        description="Rows of the token embedding: the vocabulary of the tokenizer, CLIP's BPE with 49,408 ids "
        "(the only tokenizer filipctl ships, so the only value accepted).",
    )
    width: int = Field(512, gt=0, description="Transformer width.")
    layers: int = Field(12, gt=0, description="Number of transformer blocks.")
    heads: int = Field(8, gt=0, description="Attention heads; must divide width.")

    @model_validator(mode="after")
    def _shapes(self) -> "TextTower":
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(f"vocab_size {self.vocab_size} does not match the tokenizer (CLIP BPE, "
                             f"{CLIP_VOCAB_SIZE} ids); leave it out or set {CLIP_VOCAB_SIZE}")
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} does not divide width {self.width}")
        return self


class ModelConfig(Section):
    """The FILIP dual encoder."""

    embed_dim: int = Field(256, gt=0, description="Shared token embedding dimension (paper: 256).")
    interaction: Literal["late", "global"] = Field(
        "late",
        description="late: FILIP token-wise max similarity; global: CLIP pooled similarity (ablation baseline).",
    )
    init_temperature: float = Field(0.07, gt=0, description="Initial softmax temperature (learnable).")
    late_image_cls: bool = Field(
        True, description="The image [CLS] token takes part in late interaction, as the paper's text reads (every "
        "image token); false drops it, as public FILIP code does (MindFormers). The pooled [CLS] of the global "
        "interaction is not affected.")
    late_text_bos: bool = Field(
        True, description="The text [BOS] token takes part in late interaction; under the causal text mask it is "
        "the same vector for every caption, so false drops it.")
    token_keep: float = Field(
        1.0, gt=0, le=1,
        description="Fraction of tokens each image and each text keeps before the all-gather, chosen by their "
        "token-wise max similarity against the other modality on the same worker (paper: 0.25; 1.0 = all). "
        "Rows scored on a worker keep all their tokens; only what is sent is reduced.",
    )
    gather_dtype: Precision = Field(
        "fp32",
        description="Precision of the token features on the wire (paper: fp16). They are cast back to the "
        "training precision after the gather.",
    )
    similarity_memory_mb: float = Field(
        256.0, gt=0,
        description="Memory budget of one block of the token-wise similarity; the full [B_i, B_t, n1, n2] "
        "tensor is never built.",
    )
    image: ImageTower = Field(default_factory=ImageTower)
    text: TextTower = Field(default_factory=TextTower)


class SyntheticData(Section):
    """Generated coloured-shapes image-caption set (fine-grained: colour, shape, position), written in
    img2dataset's layout into the folders `data.train` and `data.eval` name."""

    train_samples: int = Field(4000, gt=0, description="Pairs in the training split.")
    eval_samples: int = Field(500, gt=0, description="Pairs in the held-out split.")
    samples_per_shard: int = Field(500, gt=0, description="Pairs per tar shard.")
    image_size: int = Field(64, gt=0, description="Generated image side in pixels (the loader resizes to model.image.image_size).")
    max_objects: int = Field(2, ge=1, le=3, description="Shapes per image (1..max_objects).")
    seed: int = Field(0, description="Generator seed: the same seed gives byte-identical shards.")


class TrainSource(Section):
    """One set of training shards and its share of the mix (an entry of `data.train`)."""

    url: str = Field(
        ..., min_length=1,
        description="Image-caption shards as img2dataset writes them (KEY.jpg/png/webp, KEY.txt, KEY.json): a brace "
        "pattern (s3://bucket/cc3m/{00000..00331}.tar), a glob (/data/cc12m/*.tar) or a folder of .tar files; "
        "any fsspec URL. Sample counts come from img2dataset's *_stats.json beside them, else one scan.",
    )
    weight: float = Field(1.0, gt=0, description="Share of the training samples drawn from this source (normalised).")


class FilterConfig(Section):
    """The FILIP paper's pre-training filters, applied by the data stage (also `filipctl data filter`)."""

    output: str = Field(..., min_length=1, description="Folder (any fsspec URL) for the filtered shards, one "
                        "sub-folder per training source; training reads these. filter_report.json goes beside.")
    min_side: int = Field(200, ge=0, description="Drop images whose shorter side is below this (pixels, original size).")
    max_aspect: float = Field(3.0, ge=1, description="Drop images whose aspect ratio (long / short side) exceeds this.")
    language: str | None = Field("en", description="Keep captions in this language (ISO 639-1; offline identifier "
                                 "py3langid); null = keep every language.")
    language_min_confidence: float = Field(
        0.5, ge=0, le=1, description="Drop a caption as another language only when the identifier is at least this "
        "sure (short English captions are often guessed as something else with low confidence).",
    )
    max_repeats: int = Field(10, ge=1, description="Drop every pair whose caption occurs more than this many times.")
    meaningless: bool = Field(True, description="Drop empty, digits-or-punctuation-only and file-name-like captions "
                              "('img 0.jpg', 'DSC00012').")
    samples_per_shard: int = Field(10000, gt=0, description="Pairs per filtered shard.")


class DataConfig(Section):
    """Where the image-caption shards live and how they are read."""

    train: list[TrainSource] = Field(
        default_factory=lambda: [TrainSource(url="data/shapes/train")], min_length=1,
        description="Training shards: one URL, or a list of {url, weight} sources mixed by weight. With one source, "
        "`--set data.train.url=URL` (or .weight) sets its field, a plain URL becoming {url: URL}.",
    )
    eval: str | None = Field(
        "data/shapes/eval", description="Held-out shards (same forms as a source url) for retrieval; a classnames.txt beside them "
        "(one name per line, the json 'label' indexes it) adds zero-shot classification. null = no held-out eval.",
    )
    synthetic: SyntheticData | None = Field(
        None, description="Generate the coloured-shapes set into the folders data.train and data.eval name when it "
        "is missing; null = the shards must already exist.",
    )
    filter: FilterConfig | None = Field(None, description="Filter the training shards first (the paper's rules); "
                                        "null = train on them as they are.")
    augment: bool = Field(True, description="torchvision AutoAugment on training images.")
    text_augment: bool = Field(
        False, description="Each draw of a sample uses one of its caption and its back-translated alternatives "
        "(json 'alt_captions', see `filipctl data backtranslate`), chosen at random.",
    )
    shuffle_buffer: int = Field(1000, ge=0, description="Samples in each reader's shuffle buffer (per epoch).")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (decode, augment, "
                                "tokenise); 0 = the training process reads.")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Fail the run once more than this fraction of the samples read could not be "
        "read (corrupt shards or images are otherwise skipped, counted and named in the log).",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"url": value}]
        if isinstance(value, list):
            return [{"url": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _synthetic_folders(self) -> "DataConfig":
        if self.synthetic is None:
            return self
        folders = [self.train[0].url, self.eval or ""] if len(self.train) == 1 else []
        if not folders or not all(f and not any(ch in f for ch in "{}*?[") for f in folders):
            raise ValueError("data.synthetic writes into one training folder and one eval folder: set data.train "
                             "and data.eval to one folder each (no pattern), or data.synthetic: null for your shards")
        return self


class OptimConfig(Section):
    """LAMB with linear warmup then cosine decay (paper's recipe)."""

    name: Literal["lamb", "adamw"] = Field("lamb", description="Optimizer: LAMB (layer-wise trust ratio, whatever ZeRO partitions; "
                                                   "jobs/train/lamb.py); adamw for comparison.")
    base_lr: float = Field(6e-3, gt=0, description="Base LR; peak LR = base_lr * sqrt(global_batch / 512).")
    weight_decay: float = Field(3e-2, ge=0, description="Weight decay (not applied to biases, norms, embeddings, temperature).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam/LAMB betas, each in [0, 1).")
    eps: float = Field(1e-4, gt=0, description="Adam/LAMB epsilon (paper: 1e-4).")
    warmup_steps: int = Field(3000, ge=0, description="Linear warmup steps before cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak LR.")
    grad_clip: float = Field(0.0, ge=0, description="Gradient-norm clipping; 0 = off.")


class TrainConfig(Section):
    """Pretraining loop and DeepSpeed settings."""

    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    precision: Precision = Field("bf16", description="Training precision (fp16 needs a GPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute tower activations in backward.")
    steps: int = Field(1000, gt=0, description="Optimizer steps.")
    global_batch: int | None = Field(
        None, gt=0, description="Pairs per optimizer step over all workers: the invariant of a pretraining stage. A run "
        "continued on another number of workers (train.workers, a cluster profile, a Slurm node range, a Ray worker "
        "range) keeps it: each worker runs global_batch / workers pairs per step, in micro-batches of at most "
        "micro_batch_size, accumulating their gradients (exactly: the contrastive loss still spans the whole global "
        "batch). null = micro_batch_size x workers as this recipe sets them.")
    micro_batch_size: int = Field(32, gt=0, description="The most pairs a worker runs through the towers at once "
                                  "(its memory); global_batch / micro_batch_size micro-batches make one step.")
    workers: int = Field(2, gt=0, description="Worker processes (one per device) on the local backend; a cluster "
                         "profile sets its own. Not part of the stage: a run continues at another size.")
    checkpoint_every: int = Field(500, gt=0, description="Save a DeepSpeed checkpoint every N steps; a rerun resumes from the latest.")
    log_every: int = Field(10, gt=0, description="Log metrics every N steps.")
    seed: int = Field(0, description="Seed for model init and data order.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept: the newest N verified ones (older ones are "
                                  "deleted after each save), plus those pinned in keep_checkpoint_steps.")
    keep_checkpoint_steps: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list, description="Steps whose checkpoints are never deleted (pinned), e.g. [5000, 10000].")
    max_restarts: int = Field(2, ge=0, description="Local backend: how often a failed pretraining group is restarted "
                              "from its last good checkpoint (torchrun --max-restarts); Slurm requeues "
                              "(cluster.slurm.max_requeues) and Ray restarts (cluster.ray.max_failures) on their own.")
    collective_timeout_s: float = Field(600.0, gt=0, description="A collective (all-gather, all-reduce, barrier) "
                                        "waiting longer than this fails the job naming the rank that stopped (a hung "
                                        "or dead worker).")

    @classmethod
    def with_global_batch(cls, data: Any) -> Any:
        """A train section whose null global_batch is resolved to micro_batch_size x workers as it says (defaults
        included). The recipe loader calls it before --set and the cluster profile, so that a run moved to another
        number of workers keeps the global batch its recipe implies."""
        if not isinstance(data, dict) or data.get("global_batch") is not None:
            return data

        def count(value: Any) -> int | None:
            if isinstance(value, bool):
                return None
            if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
                return int(value)
            return None

        mb = count(data.get("micro_batch_size", cls.model_fields["micro_batch_size"].default))
        workers = count(data.get("workers", cls.model_fields["workers"].default))
        return {**data, "global_batch": mb * workers} if mb and workers else data

    @model_validator(mode="before")
    @classmethod
    def _resolve_global_batch(cls, data: Any) -> Any:
        return cls.with_global_batch(data)

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainConfig":
        from jobs.train.batch_layout import LayoutError, layout_for

        if self.global_batch is None:
            raise ValueError("global_batch: give a number of pairs per step, or micro_batch_size and workers")
        try:
            layout_for(self.global_batch, self.micro_batch_size, self.workers)
        except LayoutError as exc:
            raise ValueError(str(exc)) from None
        return self


class EvalDataset(Section):
    """An evaluation set in clip_benchmark's WebDataset layout (what `clip_benchmark_export_wds` writes).

    URL/classnames.txt, URL/zeroshot_classification_templates.txt ('{c}' marks the class name),
    URL/dataset_type.txt ('retrieval'; absent = classification) and URL/SPLIT/{0..n-1}.tar with
    URL/SPLIT/nshards.txt; each sample holds an image (webp, png, jpg) and its class (.cls) or its
    captions (.txt, one per line).
    """

    url: str = Field(min_length=1, description="Folder of the set: a path or any fsspec URL (s3://, https://, ...).")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                             description="Name in metrics and result files; null = the folder's last part.")
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="Split to evaluate on.")
    linear_probe: bool = Field(True, description="Also fit a linear probe when the set is for classification and "
                               "has a 'train' split (CLIP's protocol: logistic regression, C chosen on validation).")


class EvalConfig(Section):
    """Evaluation of a pretrained model: zero-shot classification (prompt ensemble), image<->text retrieval,
    linear probe and word-patch alignment, on the held-out split and on the sets in `datasets`."""

    enabled: bool = Field(True, description="Run the eval stage after pretraining.")
    held_out: bool = Field(True, description="Evaluate on the pretraining data's held-out split (when data.eval is set).")
    datasets: list[EvalDataset] = Field(default_factory=list,
                                        description="Benchmark sets in clip_benchmark's WebDataset layout.")
    batch_size: int = Field(100, gt=0, description="Images/texts per forward pass, and rows per scoring block.")
    prefixes: list[str] = Field(
        default_factory=lambda: ["a photo of a", "a picture of a", "an image of a"],
        min_length=1,
        description="Prompt prefixes; each prompt is '{prefix} {label}. {suffix}' (sets without their own "
        "zeroshot_classification_templates.txt).",
    )
    suffixes: list[str] = Field(
        default_factory=lambda: ["", "I like it.", "It is easy to see."],
        min_length=1,
        description="Prompt suffixes; the ensemble averages token-wise similarity over prefixes x suffixes.",
    )
    recall_at: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 5, 10], min_length=1,
                                                         description="Retrieval R@K.")
    probe_features: Literal["auto", "pooled", "mean_tokens"] = Field(
        "auto", description="Image features for the linear probe: the pooled [CLS] vector, the mean of the "
        "unit-norm tokens, or auto = what the interaction trains (pooled for global, mean_tokens for late).")
    probe_val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the train split held out to choose "
                                      "the probe's regularisation when the set has no 'val' split.")
    alignment_images: int = Field(8, ge=0, le=1000, description="Images per set drawn as word-patch alignment "
                                  "maps (PNG artifacts); 0 = none.")
    seed: int = Field(0, description="Seed of the probe's validation split and solver.")

    @model_validator(mode="after")
    def _unique_names(self) -> "EvalConfig":
        seen: set[str] = {"held_out"}
        for d in self.datasets:
            name = d.name or d.url.rstrip("/").rsplit("/", 1)[-1]
            if name in seen:
                raise ValueError(f"two evaluation sets are named {name!r} (held_out is the held-out split's); "
                                 "give each entry of eval.datasets its own name")
            seen.add(name)
        return self


class TrackingConfig(Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="MLflow tracking URI (sqlite:///PATH, http(s)://HOST:PORT of an MLflow "
                            "server, a database URL); null = sqlite:///mlflow.db in the working directory.")
    experiment: str = Field("filip", min_length=1, description="MLflow experiment name.")
    timeout_s: float = Field(
        5.0, gt=0,
        le=3600, description="How long an http(s) tracking server may take to answer before `filipctl run` gives up "
        "(checked before anything is submitted).",
    )
    drain_s: float = Field(
        60.0, ge=0, le=86400, description="At the end of a run, how long the CLI keeps sending tracking records the "
        "store has not taken yet (a server down, a locked database); what is left waits in the stage folders' "
        "spools and `filipctl sync` (or `filipctl status`) sends it later. Training never waits for the store.",
    )
    system_metrics_interval_s: float = Field(
        10.0, ge=0, le=3600, description="Seconds between samples of each node's CPU, memory, disk, network (and "
        "GPU, where pynvml finds one) while a pretraining or eval job runs: the MLflow run's System metrics, "
        "`system/<node>/...` under MLflow's own names. Sampled into the stage folder like every metric, so a store "
        "that is down loses none. 0 = not sampled.",
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith(TRACKING_SCHEMES):
            raise ValueError(f"{uri!r} is not a store MLflow can use here; give sqlite:///PATH/mlflow.db, "
                             "http(s)://HOST:PORT of an MLflow server, or a database URL (postgresql://...)")
        return uri


class LocalProfile(Section):
    """Processes on this machine; a distributed stage is a torchrun group."""

    max_parallel: int | None = Field(
        None, gt=0, description="Stages that may run at once (independent ones: the variants of an ablation); "
        "null = as many as this machine's cores hold, a stage taking one core per worker process, so nothing "
        "oversubscribes. Results do not depend on it.")


def count_range(value: Any) -> int | str:
    """A count (2) or a range "MIN-MAX" (1-4) of a cluster profile, checked: 1 <= MIN <= MAX. "N" and "N-N" are the
    count N; a range stays the string "MIN-MAX" as written. Raises ValueError with the one line to show."""
    expected = f"expected a count (2) or a range MIN-MAX (1-4) with 1 <= MIN <= MAX, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(expected)
    low, dash, high = str(value).strip().partition("-")
    if not (low.strip().isdigit() and (not dash or high.strip().isdigit())):
        raise ValueError(expected)
    lo, hi = int(low), int(high) if dash else int(low)
    if not 1 <= lo <= hi:
        raise ValueError(expected)
    return lo if lo == hi else f"{lo}-{hi}"


def range_of(value: int | str) -> tuple[int, int]:
    """(MIN, MAX) of what count_range returned."""
    if isinstance(value, int):
        return value, value
    low, _, high = value.partition("-")
    return int(low), int(high)


class SlurmProfile(Section):
    """Slurm resources for the pretraining stage (data and eval run as one task on one node)."""

    max_parallel: int | None = Field(
        None, gt=0, description="Stages queued at once; null = the whole graph (Slurm holds each job until its "
        "inputs completed).")

    partition: str | None = Field(None, description="Partition (sbatch --partition); null = the cluster's default.")
    account: str | None = Field(None, description="Account to charge (sbatch --account).")
    qos: str | None = Field(None, description="Quality of service (sbatch --qos).")
    time_min: int = Field(60, gt=0, description="Time limit per job in minutes; a timed-out pretraining job requeues and resumes.")
    nodes: int | str = Field(
        1, description="Nodes for pretraining: a count (2), or a range MIN-MAX (\"1-4\", sbatch --nodes=1-4): the job "
        "starts on as many nodes as are free up to MAX (at least MIN), and again so after a requeue, e.g. on fewer "
        "nodes once one was lost; training continues from its checkpoint on the workers it got, with the same global "
        "batch (train.global_batch).")
    tasks_per_node: int = Field(1, gt=0, description="Worker processes per node: one per device (GPU).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (sbatch --gpus-per-node); 0 = CPU only.")
    cpus_per_task: int | None = Field(None, gt=0, description="CPU cores per worker process.")
    mem_gb: float | None = Field(None, gt=0, description="Memory per node in GB; null = the partition's default.")
    constraint: str | None = Field(None, description="Node features (sbatch --constraint).")
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict, description="Extra sbatch options, e.g. {exclusive: true, reservation: big}."
    )
    setup: list[str] = Field(
        default_factory=list, description="Shell lines run before each job, e.g. 'module load cuda/12.4'."
    )
    signal_delay_s: int = Field(
        120, ge=10, description="Seconds before the time limit at which the job is signalled to checkpoint and requeue."
    )
    max_requeues: int = Field(3, ge=0, description="How many times a timed-out or preempted job requeues itself.")

    @field_validator("nodes", mode="before")
    @classmethod
    def _node_range(cls, value: Any) -> int | str:
        return count_range(value)

    @property
    def node_range(self) -> tuple[int, int]:
        """(MIN, MAX) nodes of a pretraining job; the same twice for a count."""
        return range_of(self.nodes)

    @property
    def elastic(self) -> bool:
        """Whether the job may get another number of nodes than the last time (nodes is a range)."""
        low, high = self.node_range
        return low != high

    @property
    def world_sizes(self) -> tuple[int, ...]:
        """Every number of workers a pretraining job may get: nodes x tasks_per_node for each node count."""
        low, high = self.node_range
        return tuple(n * self.tasks_per_node for n in range(low, high + 1))

    @property
    def world_size(self) -> int:
        """The most workers a pretraining job gets (MAX nodes x tasks_per_node)."""
        return self.world_sizes[-1]


class RayProfile(Section):
    """Ray Train: pretraining as a TorchTrainer (DeepSpeed inside each worker); data and eval as Ray tasks."""

    max_parallel: int | None = Field(
        None, gt=0, description="Stages started at once, each with its own Ray driver; null = through a Jobs API "
        "address (http://...) as many as the cluster's nodes hold their workers, otherwise one at a time.")
    address: str = Field(
        "local",
        description="local: start a private Ray on this machine; auto: the Ray cluster running here; "
        "HOST:PORT or ray://HOST:PORT: a remote cluster, each stage driven from this machine; http://HEAD:8265 (the "
        "head's Jobs API): the whole graph submitted as one Ray job, run on the cluster (--detach works, this machine "
        "may go away, independent stages run at once).",
    )
    workers: int | str = Field(
        2, description="Training workers (one per device): a count (2), or a range MIN-MAX (\"1-4\") for an elastic "
        "worker group (Ray Train ScalingConfig(num_workers=(MIN, MAX))): it starts with as many as the nodes hold, "
        "up to MAX (at least MIN), and after a failure again, e.g. on fewer once a node was lost; training continues "
        "from its checkpoint with the same global batch (train.global_batch). Needs placement_strategy PACK or SPREAD.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources each worker reserves, e.g. {CPU: 8, GPU: 1}."
    )
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false = CPU workers (gloo).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers on nodes (Ray Train's ScalingConfig.placement_strategy): PACK as "
        "few nodes as possible, SPREAD as many, STRICT_PACK all on one node, STRICT_SPREAD each on its own node "
        "(one worker per node). A placement the cluster's nodes can never hold is refused before anything runs.",
    )
    storage_path: str = Field(
        "runs/ray",
        description="Where Ray Train keeps checkpoints: a path or s3://bucket/prefix (endpoint and credentials "
        "from the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; never recorded).",
    )
    max_failures: int = Field(2, ge=0, description="Worker-group failures tolerated; each restarts from the latest checkpoint.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a private (address: local) Ray; null = all of this machine's.")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime environment (pip, working_dir, env_vars...). Values under env_vars are never recorded.",
    )
    connect_timeout_s: float = Field(30.0, gt=0, description="Give up connecting to `address` after this long.")
    resize_interval_s: float = Field(
        60.0, ge=0, description="With a range of workers: how often a running group checks whether the nodes now hold "
        "more workers (a node came back, another run ended); if so Ray Train restarts it larger, from the last "
        "checkpoint (steps since it are trained again). ScalingConfig.elastic_resize_monitor_interval_s.")

    @field_validator("workers", mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> int | str:
        return count_range(value)

    @model_validator(mode="after")
    def _elastic_placement(self) -> "RayProfile":
        # Ray Train 2.60 sizes an elastic group by counting the workers that fit on each node, whatever the strategy:
        # a STRICT_* group of that size may fit nowhere, and Ray retries it forever.
        if self.elastic and self.placement_strategy.startswith("STRICT_"):
            raise ValueError(f"workers {self.workers} (a range) needs placement_strategy PACK or SPREAD, not "
                             f"{self.placement_strategy}: Ray Train sizes an elastic group by what fits on each node, "
                             "regardless of the strategy, and would wait forever for a group it cannot place")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(MIN, MAX) workers; the same twice for a count."""
        return range_of(self.workers)

    @property
    def elastic(self) -> bool:
        """Whether the worker group may run at another size than the last time (workers is a range)."""
        low, high = self.worker_range
        return low != high

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ScalingConfig(num_workers): the count, or (MIN, MAX) for an elastic group."""
        return self.worker_range if self.elastic else self.worker_range[0]

    @property
    def world_sizes(self) -> tuple[int, ...]:
        """Every number of workers the group may run with."""
        low, high = self.worker_range
        return tuple(range(low, high + 1))

    @property
    def world_size(self) -> int:
        """The most workers the group runs with (MAX)."""
        return self.worker_range[1]


class ClusterConfig(Section):
    """Where the stages run. `--cluster NAME` loads clusters/NAME.yaml (a profile) into this section."""

    backend: Literal["local", "slurm", "ray"] = Field(
        "local", description="local: processes on this machine; slurm: jobs through submitit; ray: Ray Train."
    )
    name: str = Field("local", description="The profile's name (shown in MLflow tags and `filipctl status`).")
    shared_dirs: list[str] = Field(
        default_factory=list,
        description="Folders every node of the cluster sees (its cluster file system), for multi-node runs: their "
        "output_dir, checkpoints and Ray storage must be under one of these, on a network file system (NFS, Lustre, "
        "GPFS, BeeGFS, CephFS...) or in s3://; anything else is taken for a node's own disk and refused.")
    local: LocalProfile = Field(default_factory=LocalProfile)
    slurm: SlurmProfile = Field(default_factory=SlurmProfile)
    ray: RayProfile = Field(default_factory=RayProfile)


class AblationConfig(Section):
    """`filipctl ablate`: variants of this recipe, each a named set of overrides (key.path: value, as --set)."""

    baseline: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides every variant starts from (the paper's baseline: global loss, no augmentation).",
    )
    components: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named components, each the overrides that add it to the baseline; `ablate --components a,b` "
        "trains the baseline, baseline + a, baseline + b and baseline + a + b.",
    )


class Recipe(Section):
    """A FILIP pretraining recipe: model, data, optimisation, training, eval, tracking, cluster."""

    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
                      description="Recipe name (MLflow run name prefix and run folder name): letters, digits, "
                      "'.', '_', '+', '-'.")
    description: str = Field("", description="Free text: `filipctl recipe validate` prints it and it becomes the "
                             "MLflow run's description.")
    output_dir: str = Field("runs", description="Where stages write: stages/<stage>-<content key>/ (checkpoints, "
                            "model.pt, logs), ablations/<run id>/ (tables, charts).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)

    @model_validator(mode="after")
    def _ablation_overrides_make_valid_recipes(self) -> "Recipe":
        """Each component (and the baseline) must give a valid recipe: a typo fails here, not mid-ablation."""
        parts = {"baseline": self.ablation.baseline, **{f"components.{k}": v for k, v in self.ablation.components.items()}}
        if not any(parts.values()):
            return self
        base = self.model_dump(mode="json", exclude={"ablation"})
        for where, overrides in parts.items():
            try:
                Recipe.model_validate(apply_overrides(base, {**self.ablation.baseline, **overrides}))
            except ValidationError as exc:
                e = exc.errors()[0]
                what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                raise ValueError(f"ablation.{where}: {'.'.join(map(str, e['loc']))}: {what}") from None
            except ValueError as exc:  # a key path through a value (ValidationError, a ValueError, is above)
                raise ValueError(f"ablation.{where}: {exc}") from None
        return self


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `data` with each `key.path: value` set, sections created as needed.

    The one implementation of dotted-path overrides: `--set` (filipctl.recipes), an ablation's
    baseline and components, and its seeds. A path through a value raises ValueError naming it.
    """
    out = copy.deepcopy(data)
    for path, value in overrides.items():
        keys = str(path).split(".")
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if _is_source_list(keys[: i + 1]):
                child = _the_one_source([] if child is None else child, ".".join(keys[: i + 1]))
                node[key] = [child]
            elif child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ValueError(f"{'.'.join(keys[: i + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def _is_source_list(keys: list[str]) -> bool:
    """Whether the recipe key at `keys` is a list of sections (data.train, eval.datasets): `recipe keys` lists
    their fields (data.train.url) as keys of the section, so --set reaches into the list's one entry."""
    model: Any = Recipe
    for key in keys:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return False
        model = _section_of(field.annotation)
    return getattr(field.annotation, "__origin__", None) is list and model is not None


def _section_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def _the_one_source(value: Any, where: str) -> dict[str, Any]:
    """The one entry of a source list as a mapping: a plain URL is its `url` (same meaning), none is a new entry.
    Several entries are ambiguous: which one a key path means is for the user to say, by giving the whole list."""
    entries = value if isinstance(value, list) else [value]
    if len(entries) > 1:
        raise ValueError(f"{where} lists {len(entries)} entries, so a key inside it names none of them; set the whole "
                         f"list instead, e.g. --set '{where}=[{{url: A, weight: 2}}, {{url: B}}]'")
    entry = entries[0] if entries else {}
    if isinstance(entry, str):
        return {"url": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a value, not a section")
    return entry
