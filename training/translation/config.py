"""The configuration of one image-translation run (ceT1 → hrT2), as data.

One dataclass covers the three models; fields a model does not use are ignored by it. Defaults follow
the papers: CycleGAN-seg (method a) weights adv:cycle:identity:seg = 1:10:5:100, Adam 1e-4 with
betas (0.5, 0.999) and a multiplicative learning-rate decay per epoch; CUT (Park et al. 2020) PatchNCE
with temperature 0.07, 256 patches per layer, 256-dimensional MLP projections, identity NCE.
The config is written next to every run's checkpoints and into the exported translator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MODELS = ("cyclegan_seg", "cut", "cutseg")


@dataclass
class TranslationConfig:
    """One translation run.

    ``image_size``: training patch, (y, x) for ``dims=2`` (random axial slices cut to this size) or
    (z, y, x) for ``dims=3``. Iteration counts (``iterations``, ``seg_warmup_iterations``,
    ``pretrain_iterations``, ``save_at``, ``checkpoint_every``) count optimiser steps (one batch each).
    ``slab_slices`` (odd, 2D only): > 1 makes the translation 2.5D — generators and discriminators read and
    write a slab of that many neighbouring axial slices as channels (the discriminators then judge whether
    neighbouring slices agree, as they do in a real scan), segmentation heads label the slab's centre slice,
    and a volume is translated slab by slab keeping each centre slice (neighbours from
    ``VSCochleaSegLib.inference.neighbour_slices``, the rule the 2.5D segmentation members use).
    An "epoch" for the learning-rate decay is ``epoch_iterations`` steps: lr(it) = lr · lr_decay^⌊it/epoch⌋.
    """

    model: str = "cyclegan_seg"  # cyclegan_seg (method a) | cut | cutseg (method b)
    dims: int = 2
    image_size: tuple = (112, 128)
    slab_slices: int = 1  # 2D only: neighbouring axial slices read and written together (odd; 1 = plain 2D)
    iterations: int = 2000
    batch_size: int = 4
    # networks
    base_filters: int = 32  # generator: base · (1, 2, 4, 8) over the 4 resolutions of a 3-level U-Net
    levels: int = 3  # generator down-samplings
    disc_filters: int = 64
    disc_layers: int = 3  # 3 = the 70×70 PatchGAN in 2D; fewer for small patches
    seg_network: dict | None = None  # cutseg's segmentation module (a NetworkSpec dict); None = derived
    # optimisation
    lr: float = 1e-4
    disc_lr: float | None = None  # the discriminators' Adam learning rate; None = ``lr`` (CycleGAN, CUT)
    betas: tuple = (0.5, 0.999)
    lr_decay: float = 0.98
    epoch_iterations: int = 100
    seg_lr: float = 1e-3  # cutseg's segmentation module (Adam)
    # loss weights (cyclegan_seg: adv:cycle:identity:seg = 1:10:5:100)
    weight_adv: float = 1.0
    weight_cycle: float = 10.0  # applies to the image-space and the k-space cycle terms alike
    kspace_cycle: str = "complex"  # complex | magnitude | none (see losses.kspace_l1)
    weight_identity: float = 5.0
    weight_seg: float = 100.0
    seg_warmup_iterations: int = 500  # cyclegan_seg: fake-hrT2 segmentation loss off before this
    seg_grad_to_generator: bool = True  # segmentation losses on fake images also train the translator
    # cyclegan_seg, with seg_grad_to_generator: the share of the fake-hrT2 segmentation gradient that reaches the
    # ceT1→hrT2 generator (1 = the published coupling; e.g. 0.05 = a seg weight of 5 for the translator while the
    # hrT2 head still learns at weight_seg)
    seg_grad_scale: float = 1.0
    pool_size: int = 50  # CycleGAN's history of fakes shown to the discriminators
    # cyclegan_seg: the ceT1 → hrT2 generator also reads the VS mask as a second input channel (the source label
    # on ceT1; on the hrT2 → ceT1 → hrT2 cycle, G_B's own VS probability of the real hrT2, once its head has
    # warmed up), so it can render the tumour apart from the vessels and dura that enhance like it on ceT1.
    # Fake hrT2 is then made with the source label (``Translator.translate_volume(..., vs_mask=...)``).
    condition_on_vs: bool = False
    # cyclegan_seg: weight of the source tumour (its VS label grown by ``cycle_vs_margin`` voxels in-plane) in the
    # ceT1 → hrT2 → ceT1 cycle loss, image and k-space alike. 1 = CycleGAN. Below 1 the cycle no longer asks the
    # fake hrT2 to carry the enhancing tumour's brightness back to ceT1 (hrT2 shows a VS about as grey as brain,
    # ceT1 far brighter: to reconstruct it, G_A learns to mark the tumour, measured as a flow-void-dark fake VS);
    # the discriminator alone then shapes the fake tumour.
    cycle_vs_weight: float = 1.0
    cycle_vs_margin: int = 2
    # CUT / CutSeg
    weight_nce: float = 1.0
    nce_identity: bool = True
    nce_layers: tuple = (0, 1, 2, 3, 4)  # 0 = input image, 1..levels+1 = encoder stages
    nce_patches: int = 256
    nce_temperature: float = 0.07
    nce_dim: int = 256
    weight_seg_cutseg: float = 1.0  # cutseg's seg loss weight, relative to adversarial loss 1
    pretrain_iterations: int = 500  # cutseg: CUT alone before the segmentation module joins
    # data
    oversample_foreground: float = 0.25  # share of source patches centred on a labelled voxel
    # run
    save_at: list = field(default_factory=list)  # generator snapshots (the last iteration is always one)
    # fine-tuning: a finished or running translation folder (or its checkpoint.pt) whose networks (same
    # architecture) start this run; optimisers and image pools start fresh. None = random initialisation.
    init_weights: str | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast where the hardware has fast bf16) | bf16 | fp32

    def __post_init__(self):
        self.image_size = tuple(int(s) for s in self.image_size)
        self.betas = tuple(float(b) for b in self.betas)
        self.nce_layers = tuple(int(i) for i in self.nce_layers)
        self.save_at = sorted({int(i) for i in self.save_at})
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")
        if self.dims not in (2, 3) or len(self.image_size) != self.dims:
            raise ValueError(f"image_size {self.image_size} needs {self.dims} entries (dims={self.dims})")
        if self.slab_slices < 1 or self.slab_slices % 2 == 0:
            raise ValueError(f"slab_slices must be an odd number ≥ 1 (the slice and k neighbours on each side), "
                             f"not {self.slab_slices}")
        if self.slab_slices > 1 and (self.dims != 2 or self.model == "cutseg"):
            raise ValueError("slab_slices > 1 needs dims 2 and model cyclegan_seg or cut (CutSeg's segmentation "
                             "module reads single slices); set slab_slices to 1")
        if self.kspace_cycle not in ("complex", "magnitude", "none"):
            raise ValueError(f"kspace_cycle must be complex, magnitude or none, not {self.kspace_cycle!r}")
        if self.disc_lr is not None and not self.disc_lr > 0:
            raise ValueError(f"disc_lr must be a positive learning rate or null (= lr), not {self.disc_lr}")
        if not 0.0 <= self.seg_grad_scale <= 1.0:
            raise ValueError(f"seg_grad_scale must lie in [0, 1] (a share of the segmentation gradient), "
                             f"not {self.seg_grad_scale}")
        if self.condition_on_vs and (self.model != "cyclegan_seg" or self.slab_slices != 1):
            raise ValueError("condition_on_vs needs model cyclegan_seg with slab_slices 1; set condition_on_vs to false")
        if not 0.0 <= self.cycle_vs_weight <= 1.0 or self.cycle_vs_margin < 0:
            raise ValueError(f"cycle_vs_weight must lie in [0, 1] and cycle_vs_margin be ≥ 0 voxels, not "
                             f"{self.cycle_vs_weight} and {self.cycle_vs_margin}")
        if self.cycle_vs_weight != 1.0 and self.model != "cyclegan_seg":
            raise ValueError("cycle_vs_weight applies to model cyclegan_seg only; set it to 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if any(i < 0 or i > self.levels + 1 for i in self.nce_layers):
            raise ValueError(f"nce_layers {self.nce_layers} must lie in 0..{self.levels + 1}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> TranslationConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown translation config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path) -> TranslationConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
