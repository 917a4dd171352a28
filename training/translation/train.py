"""Train a ceT1 → hrT2 translator (:func:`train_translation`): resumable, seeded, logged.

The run folder holds ``translation_config.json``, ``checkpoint.pt`` (all networks, optimisers, image
pools and random-number states, every ``checkpoint_every`` iterations and at the end), ``log.csv``
(mean losses every ``log_every`` iterations), ``snapshots/generator_<iteration>.safetensors`` (at each
``save_at`` iteration and the last) and, when finished, the exported translator
(``translator.safetensors`` + ``translator.json``). A run started again on the same folder continues
from its checkpoint with the same random streams, so 4 + 2 iterations equal 6 in one go; a finished run
is loaded, not retrained.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from VSCochleaSegLib.inference import cpu_has_fast_bf16, resolve_device

from .config import TranslationConfig
from .data import DomainSampler
from .models import build_model, generator_kwargs
from .translator import META_FILE, Translator

CHECKPOINT = "checkpoint.pt"
SNAPSHOT_DIR = "snapshots"


def _snapshot_path(out_dir: Path, iteration: int) -> Path:
    return out_dir / SNAPSHOT_DIR / f"generator_{iteration:07d}.safetensors"


def _generator_state(net: torch.nn.Module) -> dict:
    """The translating part of a generator (its segmentation head, if any, is not needed to translate)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
            for k, v in net.state_dict().items() if not k.startswith("seg_decoder.")}


def _target_range(target_images) -> list[float]:
    """Median (min, max) of the target volumes: where the generator's [0, 1] output is mapped back to."""
    lows = [float(np.min(v)) for v in target_images]
    highs = [float(np.max(v)) for v in target_images]
    return [float(np.median(lows)), float(np.median(highs))]


def _init_networks(model, source: Path, device: torch.device) -> None:
    """Start ``model``'s networks from another run's checkpoint (fine-tuning); optimisers stay fresh."""
    path = source / CHECKPOINT if source.is_dir() else source
    if not path.exists():
        raise FileNotFoundError(f"init_weights: no translation checkpoint at {path}; train that run first or "
                                "set init_weights to null")
    nets = torch.load(path, map_location=device, weights_only=True)["model"]["nets"]
    try:
        model.load_state_dict(nets)
    except RuntimeError as e:
        raise ValueError(f"init_weights: {path} holds networks of another architecture (generator/"
                         f"discriminator filters, levels and model must match this run's): {e}") from None


def _use_bf16(device: torch.device, precision: str = "auto") -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def train_translation(source_images: list, source_labels: list, target_images: list, cfg: TranslationConfig,
                      out_dir, progress: bool = True) -> Translator:
    """Train ``cfg.model`` to translate source (ceT1) volumes into target (hrT2) ones; return the translator.

    Args:
        source_images: annotated source volumes (z, y, x), float, engine-normalised ([0, ~1.5]).
        source_labels: their label maps (z, y, x) uint8 with 0 background, 1 VS, 2 cochlea.
        target_images: unannotated target volumes (z, y, x), same scaling; need not be paired or equal in size.
        cfg: the run's :class:`TranslationConfig`.
        out_dir: run folder (created; an existing checkpoint there is resumed).
        progress: show a progress bar.
    """
    out_dir = Path(out_dir)
    (out_dir / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
    if len(source_images) != len(source_labels):
        raise ValueError(f"{len(source_images)} source images but {len(source_labels)} label maps")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ckpt_path = out_dir / CHECKPOINT

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, device, g, use_bf16=_use_bf16(device, cfg.precision))
    start = 0
    if cfg.init_weights and not ckpt_path.exists():
        _init_networks(model, Path(cfg.init_weights), device)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_checkpoint_state(ckpt["model"])
        start = int(ckpt["iteration"])
        rng.bit_generator.state = json.loads(ckpt["numpy_rng"])
        g.set_state(ckpt["torch_rng"])
    if start > cfg.iterations:
        raise ValueError(f"{ckpt_path} is at iteration {start}, past this config's {cfg.iterations} iterations")
    if start == cfg.iterations and (out_dir / META_FILE).exists():
        finished = Translator.load(out_dir, device=cfg.device)
        if finished.snapshots[-1] == cfg.iterations:
            return finished
    (out_dir / "translation_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    source = DomainSampler(source_images, cfg.image_size, rng, source_labels, cfg.oversample_foreground,
                           slab=cfg.slab_slices)
    target = DomainSampler(target_images, cfg.image_size, rng, slab=cfg.slab_slices)
    log_path = out_dir / "log.csv"
    new_log = start == 0 or not log_path.exists()
    columns = ["iteration", "lr", "seconds", *model.loss_names]
    model.train()
    with open(log_path, "w" if new_log else "a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(columns)
        t0, running = time.time(), []
        bar = tqdm(range(start, cfg.iterations), desc=f"translation ({cfg.model})", disable=not progress,
                   initial=start, total=cfg.iterations)
        for it in bar:
            factor = cfg.lr_decay ** (it // cfg.epoch_iterations)
            model.set_learning_rate(factor)
            real_a, labels_a = source.batch(cfg.batch_size)
            real_b, _ = target.batch(cfg.batch_size)
            model.set_input(real_a, labels_a, real_b)
            losses = model.optimize_parameters(it)
            if not all(np.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"non-finite translation loss at iteration {it + 1}: {losses}")
            running.append(losses)
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                means = {k: float(np.mean([r[k] for r in running])) for k in model.loss_names}
                writer.writerow([done, cfg.lr * factor, round(time.time() - t0, 2)]
                                + [round(means[k], 5) for k in model.loss_names])
                f.flush()
                bar.set_postfix(G=f"{means[model.loss_names[0]]:.3f}")
                running = []
            if done in cfg.save_at or done == cfg.iterations:
                save_file(_generator_state(model.translator()), str(_snapshot_path(out_dir, done)))
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                tmp = ckpt_path.with_suffix(".tmp")
                torch.save({"model": model.checkpoint_state(), "iteration": done,
                            "numpy_rng": json.dumps(rng.bit_generator.state), "torch_rng": g.get_state()}, tmp)
                tmp.replace(ckpt_path)

    wanted = [it for it in cfg.save_at if it < cfg.iterations] + [cfg.iterations]
    snapshots = {it: load_file(str(_snapshot_path(out_dir, it))) for it in wanted if _snapshot_path(out_dir, it).exists()}
    meta = {"model": cfg.model, "dims": cfg.dims, "image_size": list(cfg.image_size),
            "generator": generator_kwargs(cfg, conditioned=cfg.condition_on_vs), "target_range": _target_range(target_images), "config": cfg.to_dict()}
    model.eval()
    translator = Translator.from_model(model, meta, snapshots, device=cfg.device)
    translator.save(out_dir)
    return translator
