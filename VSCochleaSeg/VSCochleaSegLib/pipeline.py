"""Segment an hrT2 scan end to end with one model folder: the engine's main entry point.

Usage (plain Python, the Slicer Python console, or the CLI underneath)::

    from VSCochleaSegLib.pipeline import Segmenter
    from VSCochleaSegLib.io import read_image
    segmenter = Segmenter()                      # bundled model, device "auto", full ensemble
    result = segmenter.segment_image(read_image("case_hrT2.nii.gz"))
    print(result.measurements.vs_volume_ml, result.measurements.vs_side)
    # result.labels: SimpleITK image on the input grid, 0 background, 1 VS, 2 cochlea

The flow is one way: normalise → localise both ears → for each ear resample a crop, run every member,
fuse → map the fused probabilities back onto the input grid → labels (arg-max, optional VS threshold) → post-process → measure.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .checks import ScanChecks, check_scan
from .errors import Cancelled, ModelError
from .fusion import FUSERS, agreement, combine_agreement
from .geometry import box_grid, labels_to_image, resample_channels_to_reference, resample_to_grid
from .inference import InferenceSettings, predict_softmax, release_device_memory, resolve_device
from .localise import EarLocations, localise_ears
from .measure import Measurements, measure
from .model_folder import LOCALISER_KEY, ModelFolder, resolve_model
from .networks import build_network, load_inference_state_dict
from .normalisation import fit_intensity_scale
from .postprocess import labels_from_probabilities, postprocess_labels

log = logging.getLogger(__name__)

QUALITIES = ("full", "fast")
StageProgress = Optional[Callable[[str, float], None]]


@dataclass
class SegmentationResult:
    """What one scan gives: labels on the input grid, measurements, provenance and timings (s)."""

    labels: sitk.Image
    measurements: Measurements
    model_name: str
    model_version: str
    members: list
    device: str
    cochlea_centres_lps: dict
    midline_point_lps: tuple
    timings_s: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready record of everything but the label image."""
        return {
            "measurements": self.measurements.to_dict(),
            "model": {"name": self.model_name, "version": self.model_version, "members": self.members},
            "device": self.device,
            "cochlea_centres_lps_mm": {k: [float(x) for x in v] for k, v in self.cochlea_centres_lps.items()},
            "midline_point_lps_mm": [float(x) for x in self.midline_point_lps],
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "warnings": list(self.warnings),
        }


class Segmenter:
    """A loaded model ready to segment scans. Networks are built once and reused for every scan.

    model: None (default bundled model), a registered name, a model folder path, or a ModelFolder.
    device: "auto" | "cpu" | "cuda". quality: "full" (every default member) or "fast" (first member).
    threads: cap on CPU threads (None: PyTorch's default). checks: thresholds of the pre-flight checks
    every scan passes before any network runs (field of view, memory, contrast; see checks.py).
    On CPU the same scan and model give the same labels bit for bit (Testing/test_reliability.py).
    """

    def __init__(self, model=None, device: str = "auto", quality: str = "full", threads: Optional[int] = None,
                 settings: InferenceSettings = InferenceSettings(), checks: ScanChecks = ScanChecks()):
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, not {quality!r}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.folder: ModelFolder = model if isinstance(model, ModelFolder) else resolve_model(model)
        self.spec = self.folder.spec
        self.device = resolve_device(device)
        self.settings = settings
        self.checks = checks
        members = [m for m in self.spec.segmentation.members if m.in_default]
        self.members = members[:1] if quality == "fast" else members
        self.quality = quality
        self._localiser = self._load(LOCALISER_KEY, self.spec.localiser.network)
        self._nets = [self._load(m.name, m.network) for m in self.members]

    def _load(self, key, network_spec) -> torch.nn.Module:
        net = build_network(network_spec)
        try:
            load_inference_state_dict(net, self.folder.load_weights(key))
        except RuntimeError as exc:  # shapes or names differ from model.json's network description
            raise ModelError(f"{self.folder.path}: weights for {key!r} do not match the network in model.json: {exc}") from exc
        return net.eval().to(self.device)

    def release(self) -> None:
        """Free GPU memory held by cached allocations (weights stay loaded)."""
        release_device_memory(self.device)

    def _to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self._localiser = self._localiser.to(self.device)
        self._nets = [n.to(self.device) for n in self._nets]
        torch.cuda.empty_cache()

    def segment_image(self, image: sitk.Image, progress: StageProgress = None, cancel=None) -> SegmentationResult:
        """Segment one scan (SimpleITK image, any orientation). ``progress(stage, fraction)``;
        ``cancel()`` → True stops at the next window with :class:`Cancelled`.

        Raises InputError before any network runs if the scan fails :func:`checks.check_scan`. CUDA
        out-of-memory is retried with one window per batch, then on the CPU; each step is a warning.
        """
        warnings = check_scan(image, self.spec, self.checks)
        while True:
            try:
                result = self._segment(image, progress, cancel)
                break
            except torch.cuda.OutOfMemoryError:
                note = self._fall_back_after_out_of_memory()
                if note is None:
                    raise
                log.warning(note)
                warnings.append(note)
        result.warnings = warnings + result.warnings
        return result

    def _fall_back_after_out_of_memory(self) -> Optional[str]:
        """Take the next step down after CUDA ran out of memory; the step's message, or None if none is left."""
        if self.device.type != "cuda":
            return None
        torch.cuda.empty_cache()
        slice_batches = any(len(m.patch_size_zyx) == 2 for m in self.members) and self.settings.slice_batch_size > 1
        if self.settings.sw_batch_size > 1 or slice_batches:
            self.settings = dataclasses.replace(self.settings, sw_batch_size=1, slice_batch_size=1)
            return "CUDA ran out of memory; retrying with one window per batch (slower)."
        self._to_cpu()
        return "CUDA ran out of memory; this scan was segmented on the CPU (slower)."

    def _segment(self, image: sitk.Image, progress: StageProgress, cancel) -> SegmentationResult:
        def report(stage):
            return (lambda f: progress(stage, f)) if progress else None

        def check_cancel():
            if cancel is not None and cancel():
                raise Cancelled("Cancelled by the user; nothing was written.")

        timings = {}
        t0 = time.perf_counter()
        image = sitk.Cast(image, sitk.sitkFloat32)
        scale = fit_intensity_scale(sitk.GetArrayViewFromImage(image), self.spec.normalisation)
        ears: EarLocations = localise_ears(image, self._localiser, self.spec.localiser, scale, self.device,
                                           self.settings, cancel, report("localise"))
        timings["localise"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        shape = image.GetSize()[::-1]
        n_classes = 3
        prob_sum = np.zeros((n_classes,) + tuple(shape), np.float32)
        coverage = np.zeros(shape, np.float32)
        per_crop_agreement = []
        seg = self.spec.segmentation
        sides = ("left", "right")
        steps = len(sides) * len(self.members)
        for s_idx, side in enumerate(sides):
            centre = ears.cochlea_lps[side] + ears.medial_direction(side) * self.spec.crop.medial_offset_mm
            grid = box_grid(centre, self.spec.crop.size_xyz_mm, seg.spacing_xyz_mm,
                            mirror_x=(side == "right" and self.spec.crop.mirror_right))
            crop = scale.apply(resample_to_grid(image, grid))
            member_probs = []
            for m_idx, (member, net) in enumerate(zip(self.members, self._nets)):
                check_cancel()
                done = s_idx * len(self.members) + m_idx

                def member_progress(f, done=done):
                    if progress:
                        progress("predict", (done + f) / steps)

                member_probs.append(predict_softmax(net, crop, member.patch_size_zyx, self.device, self.settings,
                                                    cancel, member_progress))
            fused = FUSERS[seg.fusion](member_probs, [m.weight for m in self.members])
            per_crop_agreement.append(agreement(member_probs, fused))
            mapped = resample_channels_to_reference(fused, grid, image)
            if mapped is None:
                continue
            sl, maps, cover = mapped
            prob_sum[(slice(None),) + sl] += maps
            coverage[sl] += cover
        timings["predict"] = time.perf_counter() - t1
        check_cancel()

        t2 = time.perf_counter()
        if progress:
            progress("postprocess", 0.0)
        # Where no crop reaches, the scan is background; where crops overlap, average them.
        # In place: at the input grid's size these arrays dominate memory (checks.estimate_peak_bytes).
        prob_sum[1:] /= np.maximum(coverage, 1e-6)
        prob_sum[0] = 1.0 - prob_sum[1:].sum(0)
        labels = labels_from_probabilities(prob_sum, self.spec.postprocess.vs_min_probability)
        labels[coverage <= 0.5] = 0
        del prob_sum, coverage
        labels = postprocess_labels(labels, image, ears, self.spec.postprocess)
        label_image = labels_to_image(labels, image)
        timings["postprocess"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        if progress:
            progress("measure", 0.0)
        confidence = combine_agreement(per_crop_agreement)
        measurements = measure(label_image, ears.midline_point_lps, ears.left_axis_lps, confidence)
        timings["measure"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
        if progress:
            progress("measure", 1.0)
        return SegmentationResult(
            labels=label_image,
            measurements=measurements,
            model_name=self.spec.name,
            model_version=self.spec.version,
            members=[m.name for m in self.members],
            device=str(self.device),
            cochlea_centres_lps={k: tuple(float(x) for x in v) for k, v in ears.cochlea_lps.items()},
            midline_point_lps=tuple(float(x) for x in ears.midline_point_lps),
            timings_s=timings,
            warnings=list(ears.warnings),
        )
