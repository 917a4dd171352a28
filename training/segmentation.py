"""nnU-Net-style supervised training of one DynUNet (2D slices or 3D patches) on prepared arrays.

One trainer serves the localiser, the 3D and the 2D segmentation members: Dice + cross-entropy with deep
supervision, foreground-oversampled random patches (a third centred on a VS voxel, a sixth on a cochlea
voxel), intensity augmentation, poly learning-rate decay, bf16 autocast on CPUs that have it, periodic
checkpoints (resumable) and a CSV log. Arrays are (z, y, x); 2D networks train on axial slices.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch.optim.swa_utils import AveragedModel
from safetensors.torch import load_file
from tqdm import tqdm

from VSCochleaSegLib.inference import cpu_has_fast_bf16, neighbour_slices
from VSCochleaSegLib.model_folder import NetworkSpec
from VSCochleaSegLib.networks import build_network, inference_state_dict, load_inference_state_dict

from . import distributed
from .augment import augment_intensity, augment_spatial, random_contrast, randomise_label_intensity


@dataclass
class TrainConfig:
    """One network's training run. ``patch_size_zyx``: (z, y, x) for 3D, (y, x) for 2D."""

    network: dict
    patch_size_zyx: list
    iterations: int = 1000
    batch_size: int = 2
    optimizer: str = "sgd"  # sgd (nnU-Net: momentum 0.99, nesterov) | adamw
    learning_rate: float = 0.01
    weight_decay: float = 3e-5
    oversample_vs: float = 0.33
    oversample_cochlea: float = 0.17
    augment_probability: float = 0.15
    # nnU-Net's spatial augmentation (``augment.augment_spatial``): per-sample probability of an in-plane
    # rotation within ±rotation_degrees and, independently, of a zoom in scale_range; 0 = off.
    spatial_probability: float = 0.0
    rotation_degrees: float = 15.0
    scale_range: list = field(default_factory=lambda: [0.85, 1.25])
    # Domain randomisation: share of training patches passed through a fresh random intensity curve
    # (``augment.random_contrast``) before the nnU-Net intensity augmentation; 0 = off (plain nnU-Net).
    random_contrast_probability: float = 0.0
    # With it: the VS of a randomised patch gets its own random intensity (``augment.randomise_label_intensity``)
    # instead of the one the curve gives every tissue of the tumour's source intensity.
    random_contrast_vs_independent: bool = False
    # Per-class weights of the cross-entropy and Dice terms (background, VS, cochlea); None = equal.
    class_weights: list | None = None
    # Stochastic weight averaging (Izmailov et al. 2018; SWAD, Cha et al. 2021, for domain generalisation):
    # export the mean of the weights sampled every ``swa_every`` iterations from ``swa_start_fraction`` of
    # training on, instead of the last weights; 0 = off.
    swa_start_fraction: float = 0.0
    swa_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def network_spec(self) -> NetworkSpec:
        return NetworkSpec.from_dict(self.network, source="training config", field="network")


def _random_patch(img, lab, patch, rng, centre=None):
    """Cut ``patch`` (same ndim as ``lab``) around ``centre`` (or uniformly at random), zero-padding outside.
    ``img`` is shaped like ``lab`` or has one leading channel axis more (2.5D slices), which is kept whole."""
    shape = np.array(lab.shape)
    patch = np.array(patch)
    if centre is None:
        lo = np.array([rng.integers(min(0, s - p), max(s - p, 0) + 1) for s, p in zip(shape, patch)])
    else:
        lo = np.asarray(centre) - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1)
    hi = lo + patch
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    out_img = np.zeros(img.shape[: img.ndim - len(patch)] + tuple(patch), np.float32)
    out_lab = np.zeros(patch, np.uint8)
    dst = tuple(slice(a - l, b - l) for a, b, l in zip(src_lo, src_hi, lo))
    src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    out_img[(..., *dst)] = img[(..., *src)]
    out_lab[dst] = lab[src]
    return out_img, out_lab


class PatchSampler:
    """Draws training batches from a list of (image, labels) arrays (z, y, x).

    ``batch()`` returns images (B, C, *patch) float32 and labels (B, 1, *patch) int64; C is the network's
    ``in_channels`` (2D networks with C = 2k + 1 get each slice with its k neighbours on either side, the
    labels of the centre slice). ``contrast_probability`` (one value per array) replaces the config's
    ``random_contrast_probability`` array by array (self-training: none on the real crops, say)."""

    def __init__(self, arrays: list, cfg: TrainConfig, rng: np.random.Generator,
                 contrast_probability: list[float] | None = None):
        self.arrays, self.cfg, self.rng = arrays, cfg, rng
        if contrast_probability is not None and len(contrast_probability) != len(arrays):
            raise ValueError(f"{len(contrast_probability)} contrast probabilities for {len(arrays)} arrays")
        self.contrast = (list(contrast_probability) if contrast_probability is not None
                         else [cfg.random_contrast_probability] * len(arrays))
        # Foreground voxel lists per array, computed once per distinct label array: self-training repeats the
        # pseudo-labelled crops (the same arrays) hundreds of times to reach its share of the draws.
        seen: dict[int, dict] = {}
        self.fg = []
        for _, lab in arrays:
            if id(lab) not in seen:
                seen[id(lab)] = {c: np.argwhere(lab == c) for c in (1, 2)}
            self.fg.append(seen[id(lab)])
        self.channels = cfg.network_spec.in_channels if len(cfg.patch_size_zyx) == 2 else 1

    def batch(self):
        imgs, labs = [], []
        dims = len(self.cfg.patch_size_zyx)
        for _ in range(self.cfg.batch_size):
            k = int(self.rng.integers(len(self.arrays)))
            img, lab = self.arrays[k]
            u = self.rng.random()
            cls = 1 if u < self.cfg.oversample_vs else 2 if u < self.cfg.oversample_vs + self.cfg.oversample_cochlea else None
            pts = self.fg[k].get(cls) if cls else None
            centre = pts[self.rng.integers(len(pts))] if pts is not None and len(pts) else None
            if dims == 2:
                z = int(centre[0]) if centre is not None else int(self.rng.integers(img.shape[0]))
                src = img[z] if self.channels == 1 else img[neighbour_slices(z, self.channels, img.shape[0])]
                pi, pl = _random_patch(src, lab[z], self.cfg.patch_size_zyx, self.rng, None if centre is None else centre[1:])
            else:
                pi, pl = _random_patch(img, lab, self.cfg.patch_size_zyx, self.rng, centre)
            if self.contrast[k] and self.rng.random() < self.contrast[k]:
                pi = random_contrast(pi, self.rng).astype(np.float32)
                if self.cfg.random_contrast_vs_independent:
                    pi = randomise_label_intensity(pi, pl, self.rng)
            imgs.append(pi if pi.ndim > pl.ndim else pi[None])
            labs.append(pl)
        return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(labs).astype(np.int64))[:, None]


IGNORE = 255  # label value of voxels that carry no training signal (uncertain pseudo-labels)


class DiceCEWithIgnore(torch.nn.Module):
    """nnU-Net's Dice + cross-entropy (MONAI ``DiceCELoss``: softmax, one-hot target, batch Dice) where voxels
    labelled :data:`IGNORE` count in neither term. ``logits`` (B, C, *spatial), ``target`` (B, 1, *spatial)
    int64. Without ignored voxels it is exactly ``DiceCELoss``."""

    def __init__(self, class_weights: torch.Tensor | None = None, smooth: float = 1e-5):
        super().__init__()
        self.plain = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=class_weights,
                                smooth_nr=smooth, smooth_dr=smooth)
        self.class_weights, self.smooth = class_weights, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        if bool(valid.all()):
            return self.plain(logits, target)
        mask = valid.to(logits.dtype)
        clean = torch.where(valid, target, torch.zeros_like(target))
        prob = torch.softmax(logits, 1) * mask
        onehot = torch.zeros_like(logits).scatter_(1, clean, 1.0) * mask
        dims = [0, *range(2, logits.ndim)]  # batch Dice: sums over the batch and space, one value per class
        inter, denom = (prob * onehot).sum(dims), prob.sum(dims) + onehot.sum(dims)
        dice = 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)
        if self.class_weights is not None:
            dice = dice * self.class_weights
        ce = F.cross_entropy(logits, target[:, 0], weight=self.class_weights, ignore_index=IGNORE) \
            if bool(valid.any()) else logits.sum() * 0.0
        return dice.mean() + ce


def _optimizer(net, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), cfg.learning_rate, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def set_poly_learning_rate(opt, cfg: TrainConfig, iteration: int) -> float:
    """nnU-Net's poly schedule: lr = base · (1 − iteration / iterations)^0.9, set on every group; returns it."""
    lr = cfg.learning_rate * (1 - iteration / cfg.iterations) ** 0.9
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def dice_per_class(pred: np.ndarray, lab: np.ndarray, classes=(1, 2)) -> dict:
    out = {}
    for c in classes:
        a, b = pred == c, lab == c
        d = a.sum() + b.sum()
        out[c] = 1.0 if d == 0 else 2.0 * float((a & b).sum()) / float(d)
    return out


def load_initial_weights(net: torch.nn.Module, path: Path) -> None:
    """Warm start of ``net`` (built with deep supervision) from a training checkpoint (``*.pt``: every weight)
    or an exported member (``*.safetensors``: no deep-supervision heads; those keep their fresh weights)."""
    if path.suffix == ".safetensors":
        heads = {k: v for k, v in net.state_dict().items() if k.startswith("deep_supervision_heads")}
        load_inference_state_dict(net, {**heads, **load_file(str(path))})
    else:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["net"])


def train_network(arrays: list, cfg: TrainConfig, out_dir: Path, name: str, progress: bool = True,
                  init_from: Path | None = None, contrast_probability: list[float] | None = None) -> dict:
    """Train and return the inference state dict. Resumes from ``out_dir/<name>_checkpoint.pt`` if present;
    otherwise ``init_from`` (another run's checkpoint of the same network) gives the starting weights.
    ``contrast_probability``: per-array random-contrast probability (:class:`PatchSampler`).
    Under torchrun the network is wrapped in DistributedDataParallel (``training.distributed``); each rank
    draws its own batches and rank 0 alone writes checkpoints and logs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank = distributed.rank()
    seed = cfg.seed if rank == 0 else [cfg.seed, 10_000 + rank]
    torch.manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(cfg.seed + rank)
    dev = distributed.device()
    net = build_network(cfg.network_spec, deep_supervision=True)
    start = 0
    ckpt_path = out_dir / f"{name}_checkpoint.pt"
    ckpt = None
    if ckpt_path.exists():  # our own checkpoint from an earlier run of this config
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["net"])
        start = int(ckpt["iteration"])
        rng = np.random.default_rng([cfg.seed, start] if rank == 0 else [cfg.seed, start, rank])
    elif init_from is not None:  # warm start: weights only, fresh optimiser and schedule
        load_initial_weights(net, Path(init_from))
    net = net.to(dev)
    opt = _optimizer(net, cfg)
    swa = AveragedModel(net) if cfg.swa_start_fraction > 0 else None
    swa_start = int(round(cfg.swa_start_fraction * cfg.iterations))
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        if swa is not None and "swa" in ckpt:
            swa.load_state_dict(ckpt["swa"])
    model = distributed.wrap(net)
    main = distributed.is_main()
    if main:
        (out_dir / f"{name}_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    sampler = PatchSampler(arrays, cfg, rng, contrast_probability)
    class_weights = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, dtype=torch.float32, device=dev)
    loss_fn = DiceCEWithIgnore(class_weights)
    weights = np.array([1.0, 0.5, 0.25])
    weights = weights / weights.sum()
    use_bf16 = cpu_has_fast_bf16() if dev.type == "cpu" else torch.cuda.is_bf16_supported()
    log_path = out_dir / f"{name}_log.csv" if main else Path(os.devnull)
    new_log = not log_path.exists() or start == 0
    with open(log_path, "w" if new_log else "a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["iteration", "loss", "lr", "seconds"])
        net.train()
        t0 = time.time()
        running = []
        bar = tqdm(range(start, cfg.iterations), desc=name, disable=not (progress and main), initial=start,
                   total=cfg.iterations)
        for it in bar:
            lr = set_poly_learning_rate(opt, cfg, it)
            x, y = augment_spatial(*sampler.batch(), g, cfg.spatial_probability, cfg.rotation_degrees, cfg.scale_range)
            x = augment_intensity(x, g, cfg.augment_probability).to(dev)
            y = y.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(x)
            out = out.float()
            loss = sum(w * loss_fn(out[:, i], y) for i, w in enumerate(weights[: out.shape[1]]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
            running.append(loss.item())
            if swa is not None and it + 1 > swa_start and (it + 1 - swa_start) % cfg.swa_every == 0:
                swa.update_parameters(net)
            if (it + 1) % 20 == 0:
                writer.writerow([it + 1, np.mean(running), lr, round(time.time() - t0, 1)])
                f.flush()
                bar.set_postfix(loss=f"{np.mean(running):.3f}")
                running = []
            if main and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations):
                tmp = ckpt_path.with_suffix(".tmp")
                state = {"net": net.state_dict(), "opt": opt.state_dict(), "iteration": it + 1}
                if swa is not None:
                    state["swa"] = swa.state_dict()
                torch.save(state, tmp)
                tmp.replace(ckpt_path)
    net.eval()
    if swa is not None and int(swa.n_averaged) > 0:
        return inference_state_dict(swa.module.eval())
    return inference_state_dict(net)
