"""Mean Teacher training (Tarvainen & Valpola, NeurIPS 2017), the self-ensembling of CrossMoDA method b.

A student DynUNet learns from labelled patches (fake hrT2 with the ceT1 labels: Dice + CE with deep
supervision, as ``segmentation.train_network``) and from unlabelled real hrT2 patches through a
consistency loss: the mean squared difference between the student's softmax on one intensity
augmentation of a patch and the teacher's softmax on another augmentation of the same patch. The
teacher is the exponential moving average (EMA) of the student's weights and is what gets exported.
The consistency weight ramps up as ``w · exp(-5 (1 - t)^2)`` over ``rampup_iterations`` (Laine & Aila).
Only intensity augmentations are used, so both views stay voxel-aligned. Resumable (student, teacher,
optimiser and iteration in one checkpoint), CSV log, progress bar, DDP under torchrun.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from VSCochleaSegLib.inference import cpu_has_fast_bf16
from VSCochleaSegLib.networks import build_network, inference_state_dict

from . import distributed
from .augment import augment_intensity, augment_spatial
from .segmentation import PatchSampler, TrainConfig, _optimizer, set_poly_learning_rate


@dataclass
class MeanTeacherConfig:
    ema_decay: float = 0.99
    consistency_weight: float = 1.0
    rampup_iterations: int = 200
    unlabelled_batch_size: int = 2
    view_augment_probability: float = 0.5  # per-transform probability for each of the two views

    def to_dict(self) -> dict:
        return asdict(self)


def consistency_weight(iteration: int, mt: MeanTeacherConfig) -> float:
    """Sigmoid-shaped ramp-up from ~0 to ``consistency_weight`` over ``rampup_iterations``."""
    if mt.rampup_iterations <= 0:
        return mt.consistency_weight
    t = min(iteration / mt.rampup_iterations, 1.0)
    return float(mt.consistency_weight * np.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher ← decay · teacher + (1 − decay) · student, parameter by parameter (buffers copied)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def train_mean_teacher(labelled: list, unlabelled: list, cfg: TrainConfig, mt: MeanTeacherConfig, out_dir,
                       name: str, progress: bool = True) -> dict:
    """Train; return the teacher's inference state dict.

    labelled: [(image (z, y, x), labels uint8)]; unlabelled: [image (z, y, x)] (real hrT2 crops).
    Resumes from ``out_dir/<name>_checkpoint.pt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank = distributed.rank()
    torch.manual_seed(cfg.seed + rank)
    g = torch.Generator().manual_seed(cfg.seed + rank)
    dev = distributed.device()
    student = build_network(cfg.network_spec, deep_supervision=True)
    teacher = build_network(cfg.network_spec, deep_supervision=True)
    teacher.load_state_dict(student.state_dict())
    ckpt_path = out_dir / f"{name}_checkpoint.pt"
    start, ckpt = 0, None
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        start = int(ckpt["iteration"])
    student, teacher = student.to(dev), teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = _optimizer(student, cfg)
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
    model = distributed.wrap(student)
    main = distributed.is_main()
    rng = np.random.default_rng([cfg.seed, start, rank])
    sampler = PatchSampler(labelled, cfg, rng)
    u_cfg = TrainConfig(**{**asdict(cfg), "batch_size": mt.unlabelled_batch_size, "oversample_vs": 0.0,
                           "oversample_cochlea": 0.0})
    u_sampler = PatchSampler([(u, np.zeros(u.shape, np.uint8)) for u in unlabelled], u_cfg, rng)
    if main:
        (out_dir / f"{name}_config.json").write_text(json.dumps({"train": asdict(cfg), "mean_teacher": mt.to_dict()},
                                                                 indent=2))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    ds_weights = np.array([1.0, 0.5, 0.25])
    ds_weights = ds_weights / ds_weights.sum()
    use_bf16 = cpu_has_fast_bf16() if dev.type == "cpu" else torch.cuda.is_bf16_supported()
    log_path = out_dir / f"{name}_log.csv" if main else Path(os.devnull)
    new_log = start == 0 or not log_path.exists()
    nl = cfg.batch_size
    with open(log_path, "w" if new_log else "a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["iteration", "supervised_loss", "consistency_loss", "consistency_weight", "lr", "seconds"])
        student.train()
        t0, sup_hist, con_hist = time.time(), [], []
        bar = tqdm(range(start, cfg.iterations), desc=name, disable=not (progress and main), initial=start,
                   total=cfg.iterations)
        for it in bar:
            lr = set_poly_learning_rate(opt, cfg, it)
            x, y = augment_spatial(*sampler.batch(), g, cfg.spatial_probability, cfg.rotation_degrees, cfg.scale_range)
            u, _ = u_sampler.batch()
            x = augment_intensity(x, g, cfg.augment_probability)
            u_student = augment_intensity(u, g, mt.view_augment_probability)
            u_teacher = augment_intensity(u, g, mt.view_augment_probability)
            inputs = torch.cat([x, u_student]).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(inputs).float()
                with torch.no_grad():
                    target = torch.softmax(teacher(u_teacher.to(dev)).float(), 1)
            sup = sum(w * loss_fn(out[:nl, i], y.to(dev)) for i, w in enumerate(ds_weights[: out.shape[1]]))
            con = torch.mean((torch.softmax(out[nl:, 0], 1) - target) ** 2)
            w_con = consistency_weight(it, mt)
            loss = sup + w_con * con
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 12.0)
            opt.step()
            ema_update(teacher, student, mt.ema_decay)
            sup_hist.append(float(sup.detach()))
            con_hist.append(float(con.detach()))
            if (it + 1) % 20 == 0 or it + 1 == cfg.iterations:
                writer.writerow([it + 1, round(np.mean(sup_hist), 5), round(np.mean(con_hist), 6), round(w_con, 4),
                                 lr, round(time.time() - t0, 1)])
                f.flush()
                bar.set_postfix(sup=f"{np.mean(sup_hist):.3f}", con=f"{np.mean(con_hist):.4f}")
                sup_hist, con_hist = [], []
            if main and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations):
                tmp = ckpt_path.with_suffix(".tmp")
                torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "opt": opt.state_dict(),
                            "iteration": it + 1}, tmp)
                tmp.replace(ckpt_path)
    return inference_state_dict(teacher)
