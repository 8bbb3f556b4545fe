"""The training loop: AdamW, class weights, length-bucketed batches, validation selection, atomic
checkpoints, resume (prepare.py builds what a run starts from; evaluate.py scores and predicts; the CLI is
a thin layer over `train` and those).

Under torchrun (distributed.py) the same loop runs in every process: the model in DistributedDataParallel,
each step's batch dealt to the ranks (data/batching.py), evaluation sharded and gathered; rank 0 alone
checks and writes the run folder, logs, and on --resume reads the checkpoint and hands it to the others."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from cmath_mer.data import IGNORE_INDEX, ConversationDataset, DataError, check_compatible
from cmath_mer.data.batching import rank_batches, rows_before, split_by_utterances
from cmath_mer.data.memory import check_model_fits
from cmath_mer.errors import ConfigError
from cmath_mer.files import atomic_write, atomic_write_text
from cmath_mer.kernels import resolve_backend
from cmath_mer.kernels.utils import gpu_dots_ok
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import CMATHConfig, config_to_dict
from cmath_mer.training import distributed, run_folder
from cmath_mer.training.baseline import context_free_baseline
from cmath_mer.training.checkpoint import load_checkpoint, read_metadata, restate, save_checkpoint, save_weights
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.context_baseline import context_gru_baseline
from cmath_mer.training.determinism import deterministic_mode
from cmath_mer.training.device import check_device, on_device
from cmath_mer.training.ema import WeightAverage
from cmath_mer.training.evaluate import evaluate_split
from cmath_mer.training.feed import DeviceCorpus, Prefetcher
from cmath_mer.training.meter import StepMeter
from cmath_mer.training.metrics import save_confusion_matrix, save_training_curves
from cmath_mer.training.precision import Precision, check_precision, default_precision
from cmath_mer.training.prepare import inverse_frequency_weights, make_splits, set_input_statistics
from cmath_mer.training.preset_choice import preset_note
from cmath_mer.training.step import compile_model, make_optimizer, make_stepper
from cmath_mer.training.threads import data_line_note

NO_VALIDATION = "training loss (the data has no validation conversations)"


def learning_rate(tcfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warmup over `warmup_epochs`, then constant or cosine decay to 0 at the end of `epochs`.
    A function of the global step alone, so a resumed run follows the same schedule."""
    warmup = tcfg.warmup_epochs * steps_per_epoch
    total = max(tcfg.epochs * steps_per_epoch, 1)
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if tcfg.lr_schedule == "cosine" and step >= warmup:
        scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
    return tcfg.lr * scale


def resolve_train_config(tcfg: TrainConfig) -> TrainConfig:
    """The settings a run stores: device `auto` made concrete (cuda when torch sees one, else cpu), the
    precision chosen for it when none was given (bf16 on CUDA cards that support it, fp32 elsewhere) and the
    number of processes (torchrun's); a device or precision that cannot run here is a ConfigError."""
    device = str(check_device(tcfg.device))
    precision = tcfg.precision if tcfg.precision is not None else default_precision(device)
    check_precision(precision, distributed.local_device(device))
    return dataclasses.replace(tcfg, device=device, precision=precision,
                               world_size=distributed.context().world_size)


def cuda_graphs_blocker(tcfg: TrainConfig, config: CMATHConfig) -> str | None:
    """What this run lacks for CUDA graphs (training/graphs.py), or None when it can replay its steps."""
    if torch.device(tcfg.device).type != "cuda":
        return f"a CUDA device (this run is on {tcfg.device})"
    if resolve_backend(config.backend, torch.device(tcfg.device)) != "triton":
        return "the Triton ops (backend triton or auto): the reference attention reads cu_seqlens on the host"
    if tcfg.precision == "fp16":
        return "bf16 or fp32: fp16's loss scaler reads its inf flag on the host"
    if tcfg.precision == "fp32" and not gpu_dots_ok(torch.float32, torch.device(tcfg.device)):
        return ("bf16, or fp32 with TF32 allowed: exact fp32 takes the reference attention, which reads "
                "cu_seqlens on the host")
    if tcfg.accumulate != 1:
        return "one micro-batch per step (no --accumulate)"
    if tcfg.compile:
        return "eager modules (not --compile)"
    if tcfg.world_size > 1:
        return ("one process (not yet under torchrun: a rank's eps offset in the step's batch changes every "
                "step, and a graph would replay the first)")
    return None


def resolve_cuda_graphs(tcfg: TrainConfig, config: CMATHConfig) -> tuple[TrainConfig, str | None]:
    """CUDA graphs on by default: a run that did not choose (cuda_graphs None) replays its steps wherever it
    can; returns the settings with the choice made, and why an undecided run stays eager (None otherwise).
    --cuda-graphs on a run that cannot is a ConfigError naming the conflict."""
    why = cuda_graphs_blocker(tcfg, config)
    if tcfg.cuda_graphs is None:
        return dataclasses.replace(tcfg, cuda_graphs=why is None), why
    if tcfg.cuda_graphs and why:
        raise ConfigError(f"--cuda-graphs needs {why}")
    return tcfg, None


def train(data: ConversationDataset, config: CMATHConfig, tcfg: TrainConfig, out_dir: str | Path,
          *, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print,
          run_info: dict | None = None) -> dict:
    """Train CMATH, select the epoch on validation, write best.safetensors, last.safetensors, config.json,
    train_config.json, metrics.json and confusion_matrix.png into out_dir (a finished run removes
    last.safetensors unless tcfg.keep_last). Returns the metrics dict.

    out_dir must be new or empty, or hold a run: then `resume` continues it (same config, training settings
    and data, or RunFolderError) and `overwrite` replaces it. One process at a time writes into a folder
    (a lock). Every check runs before anything is written. run_info (e.g. the CLI's preset) is kept in the
    checkpoints' state as "run"."""
    out = Path(out_dir)
    tcfg = resolve_train_config(tcfg)
    tcfg, eager_why = resolve_cuda_graphs(tcfg, config)
    check_compatible(data, config)
    distributed.on_main(check_model_fits, config, distributed.local_device(tcfg.device))   # before any write
    fingerprint = run_folder.data_fingerprint(data, config.modalities)
    # several processes: the same data everywhere, and the run folder is rank 0's (it alone reads and writes
    # it; the folder need not be shared between machines); its refusals stop every rank
    distributed.same_everywhere(fingerprint["sha256"], "training data (SHA-256 of its tensors)")
    splits = None
    if resume:
        distributed.on_main(_check_resume, out, config, tcfg, fingerprint)
    else:
        distributed.on_main(run_folder.check_new_run_folder, out, overwrite=overwrite)
        splits = make_splits(data, tcfg.valid_fraction, tcfg.seed)
        if not _labelled(data, splits["train"]):
            raise DataError(f"{data.source}: field 'labels': no training utterance is labelled (all are "
                            f"{IGNORE_INDEX}, unlabelled)")
        check_world_size(splits, tcfg.world_size, data.source)
    with contextlib.ExitStack() as held:
        def lock_and_check():
            held.enter_context(run_folder.RunLock(out))
            checkpoint = None
            if resume:          # again under the lock: another process may have written meanwhile
                checkpoint = _check_resume(out, config, tcfg, fingerprint)
            else:
                run_folder.check_new_run_folder(out, overwrite=overwrite)
                if overwrite:
                    run_folder.clear_run(out)
            run_folder.clean_temporaries(out)
            return checkpoint
        checkpoint = distributed.on_main(lock_and_check)
        dev = torch.device(distributed.local_device(tcfg.device))
        with on_device(dev), deterministic_mode(tcfg.deterministic, dev):
            return _train(data, config, tcfg, out, checkpoint, splits, fingerprint, progress, log, run_info,
                          eager_why)


def _check_resume(out: Path, config, tcfg, fingerprint) -> Path:
    saved = run_folder.saved_run(out)
    run_folder.check_resume(saved, config, tcfg, fingerprint)
    return saved.checkpoint


def check_world_size(splits: dict, world_size: int, source) -> None:
    """Every process needs a conversation in every step, and a conversation is never cut."""
    n = len(splits["train"])
    if world_size > n:
        raise ConfigError(f"{world_size} processes and {n} training conversation(s) in {source}: every process "
                          f"needs at least one conversation per step (a conversation is never cut); start at most "
                          f"{n} processes (torchrun --nproc-per-node, --nnodes)")


def _to_cpu(obj):
    """State dicts on the CPU, to travel between ranks (a CUDA tensor would arrive on the sender's card)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _labelled(data: ConversationDataset, conversations: list[int]) -> bool:
    cu = data.cu_seqlens.tolist()
    return any(bool((data.labels[cu[i]:cu[i + 1]] != IGNORE_INDEX).any()) for i in conversations)


def _train(data, config, tcfg, out: Path, resume_from: Path | None, splits, fingerprint, progress, log,
           run_info=None, eager_why: str | None = None) -> dict:
    ctx = distributed.context()
    if not ctx.main:                     # rank 0 speaks and writes for the run
        progress, log = False, (lambda *_: None)
    device = distributed.local_device(tcfg.device)
    dev = torch.device(device)
    torch.manual_seed(tcfg.seed)
    model = CMATH(config).to(device)
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay)
    precision = Precision(tcfg.precision, dev)
    state = {"epoch": 0, "global_step": 0, "history": [], "best_valid": None, "best_test": None,
             "data": fingerprint, "train_config": dataclasses.asdict(tcfg), "run": run_info or {}}
    saved_config = config_to_dict(config)
    ema = WeightAverage(model, tcfg.ema_decay, tcfg.ema_warmup) if tcfg.ema_decay is not None else None
    if resume_from is not None:
        # rank 0 reads the checkpoint (its folder may be on rank 0's machine alone) and hands it on
        state = distributed.on_main(load_checkpoint, resume_from, model, optimizer, device, average_into=ema)
        if ctx.active:
            weights = distributed.broadcast(_to_cpu((model.state_dict(), optimizer.state_dict(),
                                                     ema.average if ema is not None else None)) if ctx.main else None)
            if not ctx.main:
                model.load_state_dict(weights[0])
                optimizer.load_state_dict(weights[1])
                if ema is not None:
                    ema.load(weights[2])
        if ema is not None:
            # where the decay's warmup ramp stands (one update per step: a checkpoint from before the count
            # was saved resumes from the step count)
            ema.updates = int(state.get("ema_updates", state["global_step"]))
        precision.load_state_dict(state.get("scaler"))
        splits = state["splits"]
        check_world_size(splits, tcfg.world_size, data.source)
        had = (state.get("train_config") or {}).get("world_size", 1)
        log(f"resumed from {resume_from} after epoch {state['epoch']}"
            + (f", with {tcfg.world_size} processes (the run had {had})" if had != tcfg.world_size else ""))
        if ctx.main:
            # a kill between two writes of an epoch leaves the small files behind the checkpoint: redo them
            # as the checkpoint has them (the new settings are written with the next checkpoint)
            if _best_behind(out, state):
                # a kill after last and before best of the epoch validation selected: last holds its weights
                save_weights(out / "best.safetensors", model, state, saved_config,
                             ema.average if ema is not None else None)
            _write_run_files(out, saved_config, state.get("train_config") or dataclasses.asdict(tcfg))
            _write_metrics(out, state)
            _redo_confusion_matrix(out, data, config, splits, state, device, tcfg.precision)
        state["train_config"] = dataclasses.asdict(tcfg)             # --epochs may have extended the run
        state.setdefault("data", fingerprint)
    else:
        state["splits"] = splits
        if tcfg.baseline and ctx.main:                             # only rank 0 writes it
            state["baseline"] = context_free_baseline(data, splits, config.modalities)
            log(_baseline_line(state["baseline"]))
            state["baseline_context"] = context_gru_baseline(data, splits, config.modalities, seed=tcfg.seed)
            log(_context_baseline_line(state["baseline_context"]))
    if config.class_weights:
        model.class_weight.copy_(inverse_frequency_weights(data, splits["train"], config.class_weight_power))
    if config.standardize_inputs:
        set_input_statistics(model, data, splits["train"])

    lengths = data.lengths()
    n_train = sum(lengths[i] for i in splits["train"])
    log(f"data {data.source}: {len(data)} conversations ({len(splits['train'])} train, {len(splits['valid'])} "
        f"valid, {len(splits['test'])} test), modalities {','.join(config.modalities)}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, "
        f"precision {tcfg.precision}" + (f", {tcfg.accumulate} micro-batches per step" if tcfg.accumulate > 1 else "")
        + (f", {ctx.world_size} processes ({dist_backend()}), about {tcfg.batch_utterances} utterances per step "
           f"over all of them" if ctx.active else "")
        + preset_note(run_info) + data_line_note(run_info)
        + (", deterministic" if tcfg.deterministic else "") + (", compiled" if tcfg.compile else "")
        + (", CUDA graphs" if tcfg.cuda_graphs else ""))
    if not splits["valid"]:
        log(f"warning: {data.source} has no validation conversations ({len(splits['train'])} training "
            f"conversation(s), none to hold out): every epoch is scored by its training loss, and the one with "
            f"the lowest is selected (metrics.json: selected_on)")
    if eager_why and dev.type == "cuda":
        log(f"eager steps, not CUDA graphs: they need {eager_why}")
    corpus_on_device = (DeviceCorpus(data, config.modalities, dev) if tcfg.data_on_device and dev.type == "cuda"
                        else None)
    compiled = compile_model(model) if tcfg.compile else None
    meter = StepMeter(dev)
    forward = compiled if compiled is not None else model
    if ctx.active:
        # buffers (class weights, input statistics) are set alike on every rank and never change: no broadcast
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False)
    stepper = make_stepper(model, optimizer, precision, tcfg.grad_clip, meter, forward=forward,
                           cuda_graphs=tcfg.cuda_graphs)
    compile_said = False
    for epoch in range(state["epoch"] + 1, tcfg.epochs + 1):
        if run_folder.patience_ran_out(state, tcfg.patience):
            break
        torch.manual_seed(tcfg.seed * 10_007 + epoch)        # dropout stream: same run whether resumed or not
        model.train()
        batches = data.bucketed_batches(splits["train"], tcfg.batch_utterances, shuffle=True,
                                        seed=tcfg.seed * 10_007 + epoch)
        steps = rank_batches(batches, lengths, ctx.world_size)         # steps[s][r]: rank r's share of step s
        batches = [shares[ctx.rank] for shares in steps]
        first_rows = [rows_before(shares, lengths, ctx.rank) for shares in steps]
        plan = [split_by_utterances(group, lengths, tcfg.accumulate) for group in batches]
        total, count, norms, steps, skipped, t0 = 0.0, 0, 0.0, 0, 0, time.perf_counter()
        # the bar counts utterances, the work done: batches differ in size (a conversation longer than a batch
        # gets one of its own; a bucket's last batch is partial), so a count of batches misstates it
        sizes = [sum(lengths[c] for c in group) for group in batches]
        bar = tqdm(total=sum(sizes), desc=f"epoch {epoch}", leave=False, disable=not progress, unit="utt")
        feed = Prefetcher(data, plan, config.modalities, dev, corpus_on_device)
        with feed:                                   # its thread stops however the loop ends
            for i, micro in enumerate(feed):
                stepper.set_lr(learning_rate(tcfg, state["global_step"], len(batches)))
                stepper(micro, tcfg.seed, state["global_step"], first_rows[i])
                if ema is not None:
                    ema.update(model)
                state["global_step"] += 1
                bar.update(sizes[i])
                if compiled is not None and i == 0 and not compile_said:
                    log(f"torch.compile: the first step took {stepper.first_step_seconds:.1f} s (compiling included)")
                    compile_said = True
                if (i + 1) % meter.LOG_EVERY == 0 or i + 1 == len(batches):     # the logging points
                    seen = _read_meter(meter, epoch, state["global_step"], tcfg, out)
                    total += seen["loss_sum"]
                    count += seen["utterances"]
                    norms += seen["grad_norm_sum"]
                    steps += seen["steps"]
                    skipped += seen["bad_grad"]                  # fp16 only: steps the scaler skipped
                    if seen["utterances"]:
                        bar.set_postfix(loss=f"{seen['loss_sum'] / seen['utterances']:.3f}",
                                        grad_norm=f"{seen['grad_norm_sum'] / max(seen['steps'], 1):.2f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        if tcfg.cuda_graphs:
            log(f"CUDA graphs: {stepper.captured} graphs (padded batch shapes) captured in "
                f"{stepper.capture_seconds:.1f} s, {stepper.replayed} steps replayed, {stepper.uncaptured} run "
                f"eagerly (shapes beyond {stepper.MAX_GRAPHS}) so far")
        if tcfg.precision == "fp16" and steps and skipped == steps:
            # the scaler skipped every step, halving the loss scale at each. A short epoch (a small corpus) may
            # skip all its steps while the scaler comes down from 2**16; below a scale of 1 the gradients are
            # inf/NaN even unscaled, and no scale will help
            scale = precision.scaler.get_scale()
            what = (f"every step of epoch {epoch} (steps {state['global_step'] - steps + 1}-{state['global_step']}, "
                    f"lr {tcfg.lr}, precision fp16) was skipped: the gradients were inf/NaN at every loss scale "
                    f"tried, down to {scale:g}")
            if scale < 1:
                raise _stopped(what, out)
            log(f"warning: {what}; training goes on (it stops if the scale falls below 1)")
        _check_finite_weights(model, epoch, state["global_step"], tcfg, out)
        # evaluated as selected (the weight average, if any), in the training precision
        with ema.applied(model) if ema is not None else nullcontext(), precision.autocast():
            valid, _, _ = (evaluate_split(model, data, splits["valid"], sharded=True) if splits["valid"]
                           else (None, None, None))
            test, y_test, p_test = (evaluate_split(model, data, splits["test"], sharded=True) if splits["test"]
                                    else (None, None, None))
        average = ema.average if ema is not None else None
        if ema is not None:
            state["ema_updates"] = ema.updates
        if precision.state_dict() is not None:
            state["scaler"] = precision.state_dict()          # fp16: the loss scale, so resume continues it
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "utterances_per_second": n_train / train_seconds,
               "valid": valid, "test": test, "grad_norm": norms / max(steps - skipped, 1)}
        if tcfg.precision == "fp16":
            row["skipped_steps"] = skipped
        state["history"].append(row)
        state["epoch"] = epoch
        score = valid["weighted_f1"] if valid else -row["train_loss"]
        if test is not None and (state["best_test"] is None
                                 or test["weighted_f1"] > state["best_test"]["weighted_f1"]):
            state["best_test"] = {"weighted_f1": test["weighted_f1"], "accuracy": test["accuracy"], "epoch": epoch}
        # last first (what --resume continues from), then best (the weights evaluation uses): a kill between
        # the two leaves best behind, and --resume rewrites it from last (_best_behind)
        # every rank keeps the same state (the metrics were gathered); rank 0 alone writes it
        improved = state["best_valid"] is None or score > state["best_valid"]["score"]
        if improved:
            state["best_valid"] = {"score": score, "epoch": epoch, "valid": valid, "test": test}
        if ctx.main:
            save_checkpoint(out / "last.safetensors", model, optimizer, state, saved_config, average)
            if improved:
                save_weights(out / "best.safetensors", model, state, saved_config, average)
                if test is not None:
                    save_confusion_matrix(y_test, p_test, data.class_names, out / "confusion_matrix.png",
                                          f"test, epoch {epoch} (selected on {_selected_on(state['best_valid'])})")
            _write_run_files(out, saved_config, dataclasses.asdict(tcfg))  # with the first checkpoint, never before
            _write_metrics(out, state)
        log(f"epoch {epoch:3d}/{tcfg.epochs}  loss {row['train_loss']:.4f}  "
            + (f"valid wF1 {valid['weighted_f1']:5.2f} acc {valid['accuracy']:5.2f}  " if valid else "")
            + (f"test wF1 {test['weighted_f1']:5.2f} acc {test['accuracy']:5.2f}  " if test else "")
            + f"{row['utterances_per_second']:.0f} utt/s")
        if run_folder.patience_ran_out(state, tcfg.patience):
            log(f"early stop: no better validation weighted F1 for {tcfg.patience} epochs "
                f"(best epoch {state['best_valid']['epoch']})")
    if ctx.main:
        if not tcfg.keep_last and (out / "last.safetensors").exists():
            # finished: best holds what evaluation needs, and takes the run's final state (so --resume sees a
            # finished run), then last goes; a kill between the two leaves both, as during training
            restate(out / "best.safetensors", state)
            (out / "last.safetensors").unlink()
        return json.loads((out / "metrics.json").read_text())
    return json.loads(json.dumps(_metrics(state)))             # what rank 0 wrote, without reading its folder


def _best_behind(out: Path, state: dict) -> bool:
    """best.safetensors does not hold the epoch validation selected (a kill between the epoch's two writes)."""
    best = state.get("best_valid")
    if best is None or best["epoch"] != state["epoch"]:
        return False                              # selected before the last epoch: its best was written then
    path = out / "best.safetensors"
    return not path.exists() or (read_metadata(path)["state"].get("best_valid") or {}).get("epoch") != best["epoch"]


def dist_backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def _read_meter(meter: StepMeter, epoch: int, step: int, tcfg: TrainConfig, out: Path) -> dict:
    """A logging point: the device-side sums since the last one, and the non-finite check of those steps
    (the weights of this epoch are never saved when it fails: checkpoints are written after the epoch)."""
    seen = meter.read()
    where = f"in epoch {epoch} (steps {seen['first_step']}-{step}, lr {tcfg.lr}, precision {tcfg.precision})"
    if seen["bad_loss"]:
        raise _stopped(f"the loss became non-finite (NaN/inf) {where}, in {seen['bad_loss']} of {seen['steps']} "
                       f"step(s)", out)
    if seen["bad_grad"] and tcfg.precision != "fp16":        # fp16: the scaler skipped those steps
        raise _stopped(f"the gradients became non-finite (NaN/inf) {where}", out)
    return seen


def _stopped(what: str, out: Path) -> FloatingPointError:
    """The error that stops training during an epoch, before anything of it is written (the checkpoints are
    written after the epoch), so the run folder keeps the last good epoch."""
    return FloatingPointError(f"training stopped: {what}; nothing of this epoch was saved, the checkpoints in "
                              f"{out} keep the last good epoch; try a smaller --lr")


def _check_finite_weights(model: CMATH, epoch: int, step: int, tcfg: TrainConfig, out: Path) -> None:
    """Stop before a checkpoint is written when an update made the weights NaN/inf (the loss is checked
    before the optimizer step, so it cannot see this)."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise _stopped(f"the weights became non-finite (NaN/inf, first in {name}) in epoch {epoch} (step "
                           f"{step}, lr {tcfg.lr})", out)


def _write_run_files(out: Path, config: dict, tcfg: dict) -> None:
    """config.json and train_config.json, readable copies of what the checkpoints carry; a file that
    already says the same is left alone. train_config.json also states the effective batch,
    `utterances_per_step` (over all `world_size` processes: the same for any number of them)."""
    tcfg = {**tcfg, "world_size": tcfg.get("world_size", 1), "utterances_per_step": tcfg["batch_utterances"]}
    for name, obj in (("config.json", config), ("train_config.json", tcfg)):
        text = json.dumps(obj, indent=2) + "\n"
        path = out / name
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)


def _redo_confusion_matrix(out: Path, data, config, splits, state, device, precision: str = "fp32") -> None:
    best = state.get("best_valid")
    if not best or best.get("test") is None or not splits["test"] or not (out / "best.safetensors").exists():
        return
    model = CMATH(config).to(device)
    load_checkpoint(out / "best.safetensors", model, None, device, averaged=True)
    with Precision(precision, torch.device(device)).autocast():
        _, y, p = evaluate_split(model, data, splits["test"])
    save_confusion_matrix(y, p, data.class_names, out / "confusion_matrix.png",
                          f"test, epoch {best['epoch']} (selected on {_selected_on(best)})")


def _baseline_line(b: dict) -> str:
    where = f"valid wF1 {b['valid']['weighted_f1']:5.2f}  " if b["valid"] else ""
    test = f"test wF1 {b['test']['weighted_f1']:5.2f} acc {b['test']['accuracy']:5.2f}" if b["test"] else ""
    return f"context-free baseline (logistic regression, C={b['C']:g}): {where}{test}"


def _context_baseline_line(b: dict) -> str:
    where = f"valid wF1 {b['valid']['weighted_f1']:5.2f}  " if b["valid"] else ""
    test = f"test wF1 {b['test']['weighted_f1']:5.2f} acc {b['test']['accuracy']:5.2f}" if b["test"] else ""
    return f"context baseline (bidirectional GRU, epoch {b['epoch']}): {where}{test}"


def _write_metrics(out: Path, state: dict) -> None:
    metrics = _metrics(state)
    if metrics is None:
        return
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    save_training_curves(state["history"], out / "training_curves.png", state.get("baseline"))


def _selected_on(best: dict) -> str:
    """How the epoch was selected: on validation, or (data without validation conversations) training loss."""
    return "validation" if best.get("valid") is not None else NO_VALIDATION


def _metrics(state: dict) -> dict | None:
    best = state["best_valid"]
    if best is None:
        return None
    test = best["test"] or {}
    return {
        "selected_by_validation": {"weighted_f1": test.get("weighted_f1"), "accuracy": test.get("accuracy"),
                                   "per_class_f1": test.get("per_class_f1"), "epoch": best["epoch"],
                                   "valid_weighted_f1": (best["valid"] or {}).get("weighted_f1"),
                                   "selected_on": _selected_on(best)},
        "best_test_epoch": state["best_test"],
        "baseline_context_free": state.get("baseline"),
        "baseline_context_gru": state.get("baseline_context"),
        "history": state["history"],
    }


