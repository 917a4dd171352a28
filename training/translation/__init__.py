"""Image translation ceT1 → hrT2, the first stage of both domain-adaptation methods (issue 4, part A).

Method a (CrossMoDA 2021 winner style): :class:`~.models.CycleGANSeg`, a 2D (or 3D) CycleGAN with 3-level
U-Net generators whose encoders carry segmentation decoders, cycle consistency in image space and in
k-space. Method b: :class:`~.models.CUT` (contrastive unpaired translation) and :class:`~.models.CutSeg`
(CUT trained end to end with a segmentation network). :func:`train_translation` trains one of them from
volumes and returns a :class:`Translator` that turns ceT1 volumes into fake hrT2 (several snapshots for
diversity); :func:`augment_tumour_intensity` re-scales the tumour in the fake images.

    from training.translation import TranslationConfig, train_translation
    cfg = TranslationConfig(model="cyclegan_seg", image_size=(112, 128), iterations=2000, save_at=[1000, 1500])
    translator = train_translation(cet1_volumes, cet1_labels, hrt2_volumes, cfg, "runs/x/translation")
    fake_hrt2 = [translator.translate_volume(v, s) for v in cet1_volumes for s in translator.snapshots]
"""

from .augment import augment_tumour_intensity
from .config import MODELS, TranslationConfig
from .models import CUT, CutSeg, CycleGANSeg, build_model
from .train import train_translation
from .translator import Translator

__all__ = ["MODELS", "CUT", "CutSeg", "CycleGANSeg", "TranslationConfig", "Translator",
           "augment_tumour_intensity", "build_model", "train_translation"]
