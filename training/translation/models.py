"""The three translation models, one class each, in the CycleGAN/CUT shape: ``set_input`` → ``forward`` →
``optimize_parameters``.

Domain A is the annotated source (ceT1), domain B the unannotated target (hrT2).

- :class:`CycleGANSeg` (method a): two U-Net generators, G_A: ceT1 → hrT2 and G_B: hrT2 → ceT1, each with a
  segmentation decoder on its encoder, two PatchGAN discriminators. Generator loss
  ``w_adv·LSGAN + w_cycle·(L1 + k-space L1) + w_idt·L1(identity) + w_seg·seg`` where seg is Dice+CE of
  G_A's head on real ceT1 against the ceT1 labels, plus, after ``seg_warmup_iterations``, Dice+CE of
  G_B's head on fake hrT2 G_A(ceT1) against the same labels (G_B's head is the one that later reads real
  hrT2). Discriminators see a 50-image history of fakes (Shrivastava et al. 2017, as CycleGAN). With
  ``condition_on_vs`` G_A reads (image, VS mask): the ceT1 label's VS on the A → B → A cycle, G_B's detached
  VS probability of the real hrT2 on the B → A → B cycle (zeros before the warm-up, while that head is untrained).
- :class:`CUT` (method b, Park et al. 2020): one generator, one discriminator, PatchNCE between the
  source and its translation on several encoder layers, identity PatchNCE on target images.
- :class:`CutSeg` (method b): CUT plus a segmentation network (MONAI DynUNet, so it exports like any
  engine member) trained on the translated images with the ceT1 labels, end to end with the generator,
  after ``pretrain_iterations`` of plain CUT.

Every model trains under bf16 autocast when asked (``use_bf16``); losses are computed in float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from VSCochleaSegLib.labels import VS
from VSCochleaSegLib.model_folder import NetworkSpec
from VSCochleaSegLib.networks import build_network

from .config import TranslationConfig
from .losses import cycle_loss, image_l1, lsgan_loss, patch_nce_loss, segmentation_loss
from .networks import PatchDiscriminator, PatchSampleMLP, UNetGenerator, plan_strides

N_CLASSES = 3  # background, VS, cochlea


def generator_kwargs(cfg: TranslationConfig, seg_classes: int = 0, conditioned: bool = False) -> dict:
    """Everything needed to rebuild the generator (stored with exported translators); a slab translator
    reads and writes ``cfg.slab_slices`` channels; a ``conditioned`` one reads the VS mask as one more channel."""
    return {"dims": cfg.dims, "in_channels": cfg.slab_slices + int(conditioned), "out_channels": cfg.slab_slices,
            "base_filters": cfg.base_filters, "levels": cfg.levels, "strides": [list(s) for s in plan_strides(cfg.image_size, cfg.levels)],
            "seg_classes": seg_classes}


def discriminator_kwargs(cfg: TranslationConfig) -> dict:
    return {"dims": cfg.dims, "in_channels": cfg.slab_slices, "filters": cfg.disc_filters, "n_layers": cfg.disc_layers,
            "strides": plan_strides(cfg.image_size, cfg.disc_layers)}


def seg_network_spec(cfg: TranslationConfig) -> dict:
    """CutSeg's segmentation DynUNet: ``cfg.seg_network`` or one level deeper than the generator, half its filters."""
    if cfg.seg_network is not None:
        return dict(cfg.seg_network)
    levels = cfg.levels + 1
    strides = [[1] * cfg.dims] + [list(s) for s in plan_strides(cfg.image_size, levels)]
    return {"dims": cfg.dims, "in_channels": 1, "out_channels": N_CLASSES,
            "filters": [max(8, cfg.base_filters // 2) * 2**level for level in range(levels + 1)],
            "kernel_size": [[3] * cfg.dims] * (levels + 1), "strides": strides}


class ImagePool:
    """CycleGAN's history buffer: once full, each new fake replaces a random stored one half the time and
    the stored one is shown instead, so discriminators do not forget earlier generator modes."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.g, self.images = size, generator, []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image[None]
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif float(torch.rand(1, generator=self.g)) < 0.5:
                k = int(torch.randint(len(self.images), (1,), generator=self.g))
                out.append(self.images[k].clone())
                self.images[k] = image.clone()
            else:
                out.append(image)
        return torch.cat(out)

    def state(self) -> list:
        return [i.cpu() for i in self.images]

    def load_state(self, images: list, device) -> None:
        self.images = [i.to(device) for i in images]


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; the gradient flowing back through it is multiplied by ``scale``."""
    return x.detach() + scale * (x - x.detach())


def _set_requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class TranslationModel(nn.Module):
    """Common plumbing: inputs, optimisers, learning rate, autocast, checkpoint state.

    Subclasses define ``optimizers`` (name → optimiser), ``loss_names``, :meth:`forward`,
    :meth:`optimize_parameters`, :meth:`translator` (the A → B generator) and :meth:`segmenter`.
    """

    loss_names: tuple = ()

    def __init__(self, cfg: TranslationConfig, device: torch.device, generator: torch.Generator, use_bf16: bool = False):
        super().__init__()
        self.cfg, self.device, self.g, self.use_bf16 = cfg, torch.device(device), generator, use_bf16
        self.optimizers: dict = {}
        self.pools: dict = {}

    def _adam(self, params, lr=None):
        return torch.optim.Adam(params, lr=lr or self.cfg.lr, betas=self.cfg.betas)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def set_input(self, real_a: torch.Tensor, labels_a: torch.Tensor, real_b: torch.Tensor) -> None:
        """One batch: source images (B, slab, *size) in [0, 1], their (centre slice's) labels (B, 1, *size) int,
        target images (B, slab, *size); slab is ``cfg.slab_slices`` (1 unless 2.5D)."""
        self.real_A = real_a.to(self.device, non_blocking=True)
        self.labels_A = labels_a.to(self.device, non_blocking=True)
        self.real_B = real_b.to(self.device, non_blocking=True)

    def set_learning_rate(self, factor: float) -> None:
        """Scale every optimiser's base learning rate by ``factor`` (the decay schedule's value)."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * factor

    def translator(self) -> UNetGenerator:
        raise NotImplementedError

    def segmenter(self) -> nn.Module | None:
        return None

    def checkpoint_state(self) -> dict:
        return {"nets": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "pools": {k: p.state() for k, p in self.pools.items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["nets"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, p in self.pools.items():
            p.load_state(state["pools"][k], self.device)


class CycleGANSeg(TranslationModel):
    """Method a's 2D (or 3D) CycleGAN with segmentation decoders on both generators' encoders."""

    loss_names = ("G", "adv", "cycle", "identity", "seg_real_A", "seg_fake_B", "D_A", "D_B")

    def __init__(self, cfg, device, generator, use_bf16=False):
        super().__init__(cfg, device, generator, use_bf16)
        gk, dk = generator_kwargs(cfg, N_CLASSES), discriminator_kwargs(cfg)
        self.G_A = UNetGenerator(**generator_kwargs(cfg, N_CLASSES, cfg.condition_on_vs))  # ceT1 → hrT2; segments ceT1
        self.G_B = UNetGenerator(**gk)  # hrT2 → ceT1; its head segments hrT2
        self.D_A = PatchDiscriminator(**dk)  # real hrT2 vs G_A's fakes
        self.D_B = PatchDiscriminator(**dk)  # real ceT1 vs G_B's fakes
        self.to(self.device)
        self.optimizers = {"G": self._adam(itertools.chain(self.G_A.parameters(), self.G_B.parameters())),
                           "D": self._adam(itertools.chain(self.D_A.parameters(), self.D_B.parameters()), cfg.disc_lr)}
        self.pools = {"A": ImagePool(cfg.pool_size, generator), "B": ImagePool(cfg.pool_size, generator)}

    def _with_vs(self, image: torch.Tensor, vs: torch.Tensor | None) -> torch.Tensor:
        """G_A's input: ``image``, plus the VS mask (B, 1, *size) in [0, 1] as a channel when conditioned."""
        if not self.cfg.condition_on_vs:
            return image
        return torch.cat([image, torch.zeros_like(image) if vs is None else vs.to(image.dtype)], dim=1)

    def _cycle_weight_A(self) -> torch.Tensor | None:
        """Voxel weights (B, 1, *size) of the ceT1 → hrT2 → ceT1 cycle: ``cycle_vs_weight`` on the source VS grown
        in-plane by ``cycle_vs_margin`` voxels, 1 elsewhere; None when ``cycle_vs_weight`` is 1."""
        cfg = self.cfg
        if cfg.cycle_vs_weight == 1.0:
            return None
        vs = (self.labels_A == VS).float()
        if cfg.cycle_vs_margin > 0:
            k = 2 * cfg.cycle_vs_margin + 1
            pool = nn.functional.max_pool2d if cfg.dims == 2 else nn.functional.max_pool3d
            kernel = (k, k) if cfg.dims == 2 else (1, k, k)
            vs = pool(vs, kernel, stride=1, padding=tuple(x // 2 for x in kernel))
        return 1.0 - (1.0 - cfg.cycle_vs_weight) * vs

    def forward(self, iteration: int = 0):
        cfg = self.cfg
        features_A = self.G_A.encoder(self._with_vs(self.real_A, (self.labels_A == VS).float()))
        self.fake_B = self.G_A.decode_image(features_A)
        self.seg_real_A = self.G_A.decode_segmentation(features_A)
        features_fake_B = self.G_B.encoder(self.fake_B)
        self.rec_A = self.G_B.decode_image(features_fake_B)
        self.seg_fake_B = None
        if iteration >= cfg.seg_warmup_iterations:
            if not cfg.seg_grad_to_generator:
                self.seg_fake_B = self.G_B.segment(self.fake_B.detach())
            elif cfg.seg_grad_scale == 1.0:
                self.seg_fake_B = self.G_B.decode_segmentation(features_fake_B)
            else:  # same values; the gradient into G_A is scaled by seg_grad_scale
                self.seg_fake_B = self.G_B.segment(scale_gradient(self.fake_B, cfg.seg_grad_scale))
        features_B = self.G_B.encoder(self.real_B)
        self.fake_A = self.G_B.decode_image(features_B)
        vs_B = None
        if cfg.condition_on_vs and iteration >= cfg.seg_warmup_iterations:
            with torch.no_grad():
                vs_B = torch.softmax(self.G_B.decode_segmentation(features_B).float(), dim=1)[:, VS:VS + 1]
        self.rec_B = self.G_A(self._with_vs(self.fake_A, vs_B))

    def optimize_parameters(self, iteration: int) -> dict:
        cfg = self.cfg
        with self.autocast():
            self.forward(iteration)
            _set_requires_grad([self.D_A, self.D_B], False)
            adv = lsgan_loss(self.D_A(self.fake_B), True) + lsgan_loss(self.D_B(self.fake_A), True)
            cycle = (cycle_loss(self.rec_A, self.real_A, cfg.kspace_cycle, self._cycle_weight_A())
                     + cycle_loss(self.rec_B, self.real_B, cfg.kspace_cycle))
            identity = torch.zeros((), device=self.device)
            if cfg.weight_identity > 0:
                identity = (image_l1(self.G_A(self._with_vs(self.real_B, None)), self.real_B)
                            + image_l1(self.G_B(self.real_A), self.real_A))
            seg_real = segmentation_loss(self.seg_real_A, self.labels_A)
            seg_fake = (segmentation_loss(self.seg_fake_B, self.labels_A) if self.seg_fake_B is not None
                        else torch.zeros((), device=self.device))
            loss_G = (cfg.weight_adv * adv + cfg.weight_cycle * cycle + cfg.weight_identity * identity
                      + cfg.weight_seg * (seg_real + seg_fake))
        self.optimizers["G"].zero_grad(set_to_none=True)
        loss_G.backward()
        self.optimizers["G"].step()

        _set_requires_grad([self.D_A, self.D_B], True)
        with self.autocast():
            fake_B = self.pools["B"].query(self.fake_B)
            fake_A = self.pools["A"].query(self.fake_A)
            loss_D_A = 0.5 * (lsgan_loss(self.D_A(self.real_B), True) + lsgan_loss(self.D_A(fake_B), False))
            loss_D_B = 0.5 * (lsgan_loss(self.D_B(self.real_A), True) + lsgan_loss(self.D_B(fake_A), False))
        self.optimizers["D"].zero_grad(set_to_none=True)
        (loss_D_A + loss_D_B).backward()
        self.optimizers["D"].step()
        values = (loss_G, adv, cycle, identity, seg_real, seg_fake, loss_D_A, loss_D_B)
        return {k: float(v.detach()) for k, v in zip(self.loss_names, values)}

    def translator(self):
        return self.G_A

    def segmenter(self):
        return self.G_B


class CUT(TranslationModel):
    """Contrastive unpaired translation (Park et al. 2020): G, D and the PatchNCE projection MLPs."""

    loss_names = ("G", "adv", "nce", "nce_identity", "D")

    def __init__(self, cfg, device, generator, use_bf16=False):
        super().__init__(cfg, device, generator, use_bf16)
        self.G = UNetGenerator(**generator_kwargs(cfg))
        self.D = PatchDiscriminator(**discriminator_kwargs(cfg))
        self.F = PatchSampleMLP([self.G.feature_channels[i] for i in cfg.nce_layers], cfg.nce_dim)
        self.to(self.device)
        self.optimizers = {"G": self._adam(self.G.parameters()), "D": self._adam(self.D.parameters(), cfg.disc_lr),
                           "F": self._adam(self.F.parameters())}

    def forward(self, iteration: int = 0):
        n = self.real_A.shape[0]
        real = torch.cat([self.real_A, self.real_B]) if self.cfg.nce_identity else self.real_A
        fake = self.G(real)
        self.fake_B = fake[:n]
        self.idt_B = fake[n:] if self.cfg.nce_identity else None

    def nce(self, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """PatchNCE between an input and its translation, averaged over ``nce_layers``."""
        cfg = self.cfg
        with torch.no_grad():  # keys are detached in PatchNCE anyway
            feat_k = self.G.encode(source, cfg.nce_layers)
            keys, ids = self.F(feat_k, cfg.nce_patches, generator=self.g)
        queries, _ = self.F(self.G.encode(output, cfg.nce_layers), cfg.nce_patches, ids)
        return sum(patch_nce_loss(q, k, cfg.nce_temperature) for q, k in zip(queries, keys)) / len(queries)

    def _generator_losses(self, iteration: int) -> dict:
        cfg = self.cfg
        adv = lsgan_loss(self.D(self.fake_B), True)
        nce = self.nce(self.real_A, self.fake_B)
        nce_idt = self.nce(self.real_B, self.idt_B) if cfg.nce_identity else torch.zeros((), device=self.device)
        nce_total = 0.5 * (nce + nce_idt) if cfg.nce_identity else nce
        return {"G": cfg.weight_adv * adv + cfg.weight_nce * nce_total, "adv": adv, "nce": nce, "nce_identity": nce_idt}

    def optimize_parameters(self, iteration: int) -> dict:
        with self.autocast():
            self.forward(iteration)
            _set_requires_grad([self.D], True)
            loss_D = 0.5 * (lsgan_loss(self.D(self.real_B), True) + lsgan_loss(self.D(self.fake_B.detach()), False))
        self.optimizers["D"].zero_grad(set_to_none=True)
        loss_D.backward()
        self.optimizers["D"].step()

        _set_requires_grad([self.D], False)
        with self.autocast():
            losses = self._generator_losses(iteration)
        generator_opts = [o for k, o in self.optimizers.items() if k != "D"]
        for opt in generator_opts:
            opt.zero_grad(set_to_none=True)
        losses["G"].backward()
        for opt in generator_opts:
            opt.step()
        losses["D"] = loss_D
        return {k: float(losses[k].detach()) for k in self.loss_names}

    def translator(self):
        return self.G


class CutSeg(CUT):
    """CUT + a DynUNet segmenting the translated images with the source labels, trained end to end."""

    loss_names = CUT.loss_names + ("seg",)

    def __init__(self, cfg, device, generator, use_bf16=False):
        super().__init__(cfg, device, generator, use_bf16)
        self.seg_spec = seg_network_spec(cfg)
        spec = NetworkSpec.from_dict(self.seg_spec, source="translation config", field="seg_network")
        if any(p % s for p, s in zip(cfg.image_size, spec.total_stride_zyx)):
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of the segmentation network's "
                             f"total stride {spec.total_stride_zyx}")
        self.S = build_network(spec).to(self.device)
        self.optimizers["S"] = self._adam(self.S.parameters(), lr=cfg.seg_lr)

    def _generator_losses(self, iteration: int) -> dict:
        losses = super()._generator_losses(iteration)
        seg = torch.zeros((), device=self.device)
        if iteration >= self.cfg.pretrain_iterations:
            fake = self.fake_B if self.cfg.seg_grad_to_generator else self.fake_B.detach()
            seg = segmentation_loss(self.S(fake), self.labels_A)
            losses["G"] = losses["G"] + self.cfg.weight_seg_cutseg * seg
        losses["seg"] = seg
        return losses

    def segmenter(self):
        return self.S


MODEL_CLASSES = {"cyclegan_seg": CycleGANSeg, "cut": CUT, "cutseg": CutSeg}


def build_model(cfg: TranslationConfig, device, generator: torch.Generator, use_bf16: bool = False) -> TranslationModel:
    return MODEL_CLASSES[cfg.model](cfg, device, generator, use_bf16)
