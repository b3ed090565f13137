"""Training DSRAN on a feature store: schedule, mixed precision, DDP, validation, checkpoints.

Under ``torchrun`` every process trains on its own buffers of the store (see
:mod:`dsran.train.data`) and DistributedDataParallel averages the gradients. The loss
uses the negatives of the process's own batch, as the single-process loss does.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from dsran.extract.store import FeatureStore, StoreError
from dsran.train import run as run_files
from dsran.train.batchnorm import MaskedBatchNorm
from dsran.train.config import TrainConfig, save_config
from dsran.train.data import (
    CaptionSamples,
    TrainingBatches,
    caption_samples,
    check_store_arrays,
    epoch_buffers,
    split_image_rows,
    steps_per_epoch,
    usable_image_rows,
)
from dsran.train.encode import encode_captions, encode_images
from dsran.train.loss import TripletLoss
from dsran.train.model import DSRAN, required_store_arrays
from dsran.train.precision import resolve_autocast_dtype, resolve_device
from dsran.train.text import load_text_backbone, load_tokenizer, save_text_model_files
from torch import nn
from tqdm import tqdm

from dsran import __version__

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "the feature store was extracted with randomly initialised CNN weights, so this model "
    "learns from features without pretrained visual meaning; its recalls are not comparable "
    "with published results"
)


class TrainingError(RuntimeError):
    """Training cannot start or continue: a bad store, run folder or setting."""


# ---------------------------------------------------------------------- store checks


def check_store(store: FeatureStore, config: TrainConfig, arrays: tuple[str, ...]) -> list[str]:
    """Raise TrainingError when ``store`` lacks what ``config`` needs; return warnings."""
    model = config.model
    if model.use_grid and not store.has_grid:
        raise TrainingError(
            f"feature store {store.path} has no grid features, which model.use_grid needs. "
            "Extract them with `dsran extract`, or train on regions alone with --set model.use_grid=false."
        )
    if model.use_regions and not store.has_regions:
        raise TrainingError(
            f"feature store {store.path} has no region features, which model.use_regions needs. "
            "Extract or import them, or train on the grid alone with --set model.use_regions=false."
        )
    try:
        check_store_arrays(store, arrays)
    except StoreError as error:
        raise TrainingError(
            f"{error}; configured encoders: grid {model.grid_encoder!r}, "
            f"regions {model.region_encoder!r}"
        ) from error
    if not store.has_captions:
        raise TrainingError(
            f"feature store {store.path} has no captions. Re-run `dsran extract` with --captions FILE."
        )

    available = sorted(store.splits())
    for name in config.data.train_splits:
        if name not in available:
            raise TrainingError(
                f"feature store {store.path} has no split {name!r} (data.train_splits); it has "
                f"{', '.join(available) or 'no splits'}. Give a caption file with splits to "
                "`dsran extract --captions`, or set --set data.train_splits=[NAME]."
            )
    if config.data.val_split is not None and config.data.val_split not in available:
        raise TrainingError(
            f"feature store {store.path} has no split {config.data.val_split!r} (data.val_split); "
            f"it has {', '.join(available) or 'no splits'}. Name another split with --set "
            "data.val_split=NAME, or train without validation with --set data.val_split=null."
        )

    warnings = []
    if store.random_weights:
        warnings.append(RANDOM_WEIGHTS_WARNING)
    return warnings


# ---------------------------------------------------------------------- schedule


def lr_lambda(
    steps_per_epoch_list: list[int], warmup_fraction: float, lr_update: int, lr_decay: float
):
    """Learning-rate factor of optimiser step ``step`` (0-based).

    Linear warm-up over the first ``warmup_fraction`` of all steps, then linear decay
    towards zero after the last step, times ``lr_decay`` for every ``lr_update`` finished
    epochs.
    """
    total = sum(steps_per_epoch_list)
    epoch_ends = np.cumsum(steps_per_epoch_list)
    warmup = warmup_fraction * total

    def factor(step: int) -> float:
        if step < warmup:
            shape = min(1.0, (step + 1) / warmup)
        else:
            # 1 at the end of the warm-up, 1 / (total - warmup) at the last step.
            shape = max(0.0, (total - step) / max(total - warmup, 1.0))
        epoch = int(np.searchsorted(epoch_ends, step, side="right"))
        return shape * lr_decay ** (epoch // lr_update)

    return factor


# ---------------------------------------------------------------------- distributed


@dataclass
class ProcessInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> tuple[ProcessInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = ProcessInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
    )
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None and info.distributed:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        logger.info("process %d of %d on %s", info.rank, info.world_size, device)
        if not info.is_main:
            # Rank 0 reports progress for every process; the others report errors only.
            logging.getLogger("dsran").setLevel(logging.ERROR)
    return info, device


# ---------------------------------------------------------------------- logs


class MetricsLog:
    """CSV files (and optional TensorBoard events) in the run folder, written by rank 0."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool):
        self.folder, self.enabled = folder, enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to CSV only")
            else:
                self.writer = SummaryWriter(str(folder / "tensorboard"))

    def _append(self, name: str, row: dict[str, Any]) -> None:
        path = self.folder / name
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_train_log(self, step: int) -> None:
        """Drop rows after ``step``, which a resumed run writes again."""
        path = self.folder / run_files.TRAIN_LOG
        if not self.enabled or not path.exists():
            return
        with path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
        path.unlink()
        for row in rows:
            self._append(run_files.TRAIN_LOG, row)

    def step(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(run_files.TRAIN_LOG, row)
        if self.writer is not None:
            for key in ("loss", "lr", "samples_per_s"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def validation(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(run_files.VAL_LOG, row)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(f"val/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------- the trainer


@dataclass
class TrainState:
    """Progress of training, saved with every checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    epoch_step: int = 0  # optimiser steps already done in that epoch
    step: int = 0  # optimiser steps done in total
    best_rsum: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in batch.items():
        tensor = tensor.to(device, non_blocking=True)
        out[name] = tensor.float() if tensor.dtype == torch.float16 else tensor
    return out


class Trainer:
    """Trains one run folder; :meth:`fit` runs to the end or to ``run.stop_after_steps``."""

    def __init__(
        self, config: TrainConfig, feats: str | Path, out: str | Path, resume: bool = False
    ):
        self.config = config
        self.out = Path(out)
        self.resume = resume
        if config.run.threads is not None:
            torch.set_num_threads(config.run.threads)
        self.process, self.device = init_distributed(config.run.device)
        self.autocast_dtype = resolve_autocast_dtype(self.device, config.run.precision)
        self.precision_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            self.autocast_dtype
        ]

        # 1. The store, the run folder and the text model, checked before any work.
        try:
            self.store = FeatureStore.open(feats)
            arrays = required_store_arrays(config.model)
        except (StoreError, ValueError) as error:
            raise TrainingError(str(error)) from error
        self.warnings = check_store(self.store, config, arrays)
        self.checkpoints = self.out / run_files.CHECKPOINT_DIR
        if self.process.is_main:
            self._check_folder()
        for warning in self.warnings:
            logger.warning("%s", warning)
        self.tokenizer = load_tokenizer(config.model.text_model)
        self.train_samples, self.val_rows = self._samples()
        torch.manual_seed(config.run.seed)
        backbone = load_text_backbone(config.model.text_model)
        self.model = DSRAN(config.model, backbone)

        # 2. Steps of every epoch (processes must agree on them), optimiser, schedule.
        self.epoch_steps = [self._epoch_steps(epoch) for epoch in range(config.optim.epochs)]
        if min(self.epoch_steps) < 1:
            raise TrainingError(
                f"{len(self.train_samples)} training captions give no full batch of "
                f"data.batch_size={config.data.batch_size} per process; lower the batch size"
            )
        self.model.to(self.device)
        if self.process.distributed:
            if config.run.sync_batchnorm:
                for module in self.model.modules():
                    if isinstance(module, MaskedBatchNorm):
                        module.sync = True
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        else:
            self.ddp_model = self.model
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            parameters, lr=config.optim.lr, eps=config.optim.adam_eps, weight_decay=0.0
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(
                self.epoch_steps,
                config.optim.warmup_fraction,
                config.optim.lr_update,
                config.optim.lr_decay,
            ),
        )
        # NOTE: the CUDA paths (fp16 with this scaler, bf16, NCCL) have not run on a GPU.
        # The CPU paths are tested, DDP over gloo included.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.criterion = TripletLoss(config.loss.margin, config.loss.negatives)
        self.state = TrainState()

        # 3. The run folder.
        if self.process.is_main and not resume:
            self._prepare_folder(backbone)
        self.log = MetricsLog(self.out, self.process.is_main, config.run.tensorboard)
        if resume:
            self._load_last()
            self.log.truncate_train_log(self.state.step)

    # -------------------------------------------------------------- setup helpers

    def _samples(self) -> tuple[CaptionSamples, np.ndarray | None]:
        config = self.config.data
        try:
            train_rows = split_image_rows(self.store, config.train_splits)
            train_rows = usable_image_rows(self.store, train_rows, "training")
            val_rows = None
            if config.val_split is not None:
                val_rows = usable_image_rows(
                    self.store, self.store.split(config.val_split), "validation"
                )
                if config.val_max_images is not None:
                    val_rows = val_rows[: config.val_max_images]
        except StoreError as error:
            raise TrainingError(str(error)) from error
        samples = caption_samples(
            self.store,
            train_rows,
            self.tokenizer,
            config.max_length,
            official=self.config.model.official_masking,
        )
        if not len(samples):
            raise TrainingError(
                f"the training splits {config.train_splits} of {self.store.path} have no captions"
            )
        if val_rows is not None:
            _, caption_image = self.store.captions()
            if not np.isin(val_rows, caption_image).all():
                raise TrainingError(
                    f"some images of split {config.val_split!r} have no caption, so image-to-text "
                    "recall is undefined; give captions for every image or another --set data.val_split"
                )
        logger.info(
            "%d training captions of %d images; %s validation images",
            len(samples),
            len(train_rows),
            "no" if val_rows is None else len(val_rows),
        )
        return samples, val_rows

    def _epoch_steps(self, epoch: int) -> int:
        counts = [
            sum(
                len(buffer.samples)
                for buffer in epoch_buffers(
                    self.train_samples.image_rows,
                    self.store.chunk_images,
                    self.config.data.buffer_chunks,
                    self.config.run.seed,
                    epoch,
                    rank,
                    self.process.world_size,
                )
            )
            for rank in range(self.process.world_size)
        ]
        return steps_per_epoch(counts, self.config.data.batch_size)

    def _check_folder(self) -> None:
        if self.resume:
            if not (self.checkpoints / "last.json").is_file():
                raise TrainingError(
                    f"cannot resume: {self.checkpoints / 'last.json'} not found; start a new run "
                    "without --resume"
                )
        elif self.out.exists() and any(self.out.iterdir()):
            raise TrainingError(
                f"run folder {self.out} already exists and is not empty; pass --resume to continue "
                "it, or choose another --out"
            )

    def _prepare_folder(self, backbone: nn.Module) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / run_files.CONFIG_FILE)
        save_text_model_files(backbone, self.tokenizer, self.out / run_files.TEXT_MODEL_DIR)
        self._write_metadata()

    def _write_metadata(self) -> None:
        metadata = {
            "feats": str(self.store.path.resolve()),
            "random_cnn_weights": bool(self.store.random_weights),
            "warnings": self.warnings,
            "best_epoch": self.state.best_epoch,
            "val_rsum": None
            if self.state.best_epoch < 0 or math.isinf(self.state.best_rsum)
            else self.state.best_rsum,
            "steps_done": self.state.step,
            "steps_total": sum(self.epoch_steps),
            "epochs_done": self.state.epoch,
            "finished": self.state.epoch >= self.config.optim.epochs,
            "train_captions": len(self.train_samples),
            "val_images": None if self.val_rows is None else len(self.val_rows),
            "text_model": self.config.model.text_model,
            "store_settings": self.store.settings,
            "precision": self.precision_name,
            "device": str(self.device),
            "world_size": self.process.world_size,
            "dsran_version": __version__,
            "torch_version": torch.__version__,
            "updated_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        run_files.write_json(self.out / run_files.METADATA_FILE, metadata)

    # -------------------------------------------------------------- checkpoints

    def _checkpoint_metadata(self, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        return {
            "epoch": self.state.epoch,
            "epoch_step": self.state.epoch_step,
            "step": self.state.step,
            "best_rsum": None if math.isinf(self.state.best_rsum) else self.state.best_rsum,
            "best_epoch": self.state.best_epoch,
            "history": self.state.history,
            "metrics": metrics,
            "dsran_version": __version__,
        }

    def _save_last(self) -> None:
        if not self.process.is_main:
            return
        run_files.save_weights(self.model, self.checkpoints / "last", self._checkpoint_metadata())
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        run_files.save_training_state(self.checkpoints / "last-state.pt", state)
        self._write_metadata()

    def _load_last(self) -> None:
        metadata = run_files.load_weights(self.model, self.checkpoints / "last")
        state = run_files.load_training_state(self.checkpoints / "last-state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        best = metadata.get("best_rsum")
        self.state = TrainState(
            epoch=int(metadata["epoch"]),
            epoch_step=int(metadata["epoch_step"]),
            step=int(metadata["step"]),
            best_rsum=-math.inf if best is None else float(best),
            best_epoch=int(metadata["best_epoch"]),
            history=list(metadata.get("history", [])),
        )
        logger.info(
            "resuming %s at epoch %d, step %d (%d into the epoch)",
            self.out,
            self.state.epoch + 1,
            self.state.step,
            self.state.epoch_step,
        )

    # -------------------------------------------------------------- training

    def fit(self) -> TrainState:
        """Train until the last epoch or ``run.stop_after_steps``; return the final state."""
        config = self.config
        logger.info(
            "training on %s with %s, %d steps per epoch, %d epochs, batch %d%s",
            self.device,
            self.precision_name,
            self.epoch_steps[0],
            config.optim.epochs,
            config.data.batch_size,
            f" x {self.process.world_size} processes" if self.process.distributed else "",
        )
        try:
            while self.state.epoch < config.optim.epochs:
                if not self._train_epoch():
                    return self.state
                self._end_epoch()
        finally:
            self.log.close()
        return self.state

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when stopped by stop_after_steps."""
        config, state = self.config, self.state
        batches = TrainingBatches(
            self.store.path,
            self.model.store_arrays,
            self.train_samples,
            config.data,
            self.store.chunk_images,
            config.run.seed,
            state.epoch,
            self.epoch_steps[state.epoch],
            start_step=state.epoch_step,
            rank=self.process.rank,
            world_size=self.process.world_size,
        )
        self.ddp_model.train()
        progress = tqdm(
            batches,
            desc=f"epoch {state.epoch + 1}/{config.optim.epochs}",
            unit="batch",
            disable=not self.process.is_main,
            leave=False,
        )
        window_start, window_samples, window_loss = time.perf_counter(), 0, 0.0
        for batch in progress:
            loss, lr = self._train_step(batch)
            state.step += 1
            state.epoch_step += 1

            # Logging: every step to the CSV log, every log_every steps to the console.
            window_samples += len(batch["input_ids"]) * self.process.world_size
            window_loss += loss
            elapsed = time.perf_counter() - window_start
            rate = window_samples / max(elapsed, 1e-9)
            self.log.step(
                {
                    "step": state.step,
                    "epoch": state.epoch + 1,
                    "loss": loss,
                    "lr": lr,
                    "samples_per_s": rate,
                }
            )
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if state.step % config.run.log_every == 0:
                steps = window_samples / (len(batch["input_ids"]) * self.process.world_size)
                logger.info(
                    "epoch %d step %d: loss %.4f, lr %.3g, %.1f samples/s",
                    state.epoch + 1,
                    state.step,
                    window_loss / steps,
                    lr,
                    rate,
                )
                window_start, window_samples, window_loss = time.perf_counter(), 0, 0.0

            if config.run.checkpoint_every and state.step % config.run.checkpoint_every == 0:
                self._save_last()
            if (
                config.run.stop_after_steps is not None
                and state.step >= config.run.stop_after_steps
            ):
                logger.info(
                    "stopping after %d steps (run.stop_after_steps); resume with --resume",
                    state.step,
                )
                self._save_last()
                return False
        return True

    def _train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """One optimiser step; returns the loss and the learning rate it used."""
        batch = move_batch(batch, self.device)
        if self.autocast_dtype is None:
            images, captions = self.ddp_model(batch)
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                images, captions = self.ddp_model(batch)
        loss = self.criterion(images, captions, batch["image_rows"])
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at step {self.state.step + 1}; lower optim.lr or "
                "use --precision fp32"
            )

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return float(loss.detach()), lr

    def _end_epoch(self) -> None:
        state = self.state
        metrics = self.validate() if self.process.is_main else None
        rsum = None if metrics is None else metrics["rsum"]
        improved = self.val_rows is None or (rsum is not None and rsum > state.best_rsum)
        if self.process.is_main:
            if metrics is not None:
                row = {"epoch": state.epoch + 1, "step": state.step, **metrics}
                self.log.validation(row)
                state.history.append(row)
                logger.info(
                    "epoch %d validation: rsum %.1f (i2t R@1 %.1f, t2i R@1 %.1f)%s",
                    state.epoch + 1,
                    rsum,
                    metrics["i2t_r1"],
                    metrics["t2i_r1"],
                    ", best so far" if improved else "",
                )
            if improved:
                state.best_epoch = state.epoch + 1
                if rsum is not None:
                    state.best_rsum = rsum
        state.epoch += 1
        state.epoch_step = 0
        if self.process.is_main:
            if improved:
                run_files.save_weights(
                    self.model, self.checkpoints / "best", self._checkpoint_metadata(metrics)
                )
            self._save_last()
        if self.process.distributed:
            dist.barrier()

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Recall@K and Rsum on the validation images and all their captions."""
        if self.val_rows is None:
            return None
        from dsran.evaluate.recall import retrieval_metrics

        text, caption_image = self.store.captions()
        selected = np.flatnonzero(np.isin(caption_image, self.val_rows))
        position = {int(row): i for i, row in enumerate(self.val_rows)}
        caption_positions = np.array([position[int(caption_image[i])] for i in selected])
        batch_size = self.config.data.eval_batch_size
        images = encode_images(
            self.model,
            self.store,
            self.val_rows,
            batch_size,
            self.device,
            self.config.run.precision,
        )
        captions = encode_captions(
            self.model,
            self.tokenizer,
            [str(text[i]) for i in selected],
            self.config.data.max_length,
            batch_size,
            self.device,
            self.config.run.precision,
        )
        self.model.train()
        similarity = images @ captions.T
        metrics = retrieval_metrics(similarity, caption_positions, device=self.device)
        return {key: float(value) for key, value in metrics.items()}


def train(
    config: TrainConfig, feats: str | Path, out: str | Path, resume: bool = False
) -> TrainState:
    """Train a run folder from a feature store; see :class:`Trainer`."""
    trainer = Trainer(config, feats, out, resume=resume)
    try:
        return trainer.fit()
    finally:
        if trainer.process.distributed and dist.is_initialized():
            dist.destroy_process_group()
