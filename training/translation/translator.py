"""A trained ceT1 → hrT2 translator: generator snapshots (for diverse fake hrT2) and, for cyclegan_seg and
cutseg, the built-in segmenter of real hrT2. Saved as one safetensors file plus a JSON description.

    from training.translation import Translator
    translator = Translator.load("runs/phantom/translation")
    fake_hrt2 = translator.translate_volume(cet1_zyx)                        # the last snapshot
    variants = [translator.translate_volume(cet1_zyx, s) for s in translator.snapshots]
    labels = translator.segment_volume(hrt2_zyx)                             # None for plain CUT
    fake_hrt2 = translator.translate_volume(cet1_zyx, vs_mask=cet1_labels_zyx == 1)  # VS-conditioned

Volumes are (z, y, x) arrays scaled as the engine scales scans (percentile normalisation, [0, 1.5]).
Inside, each volume is min-max normalised to [0, 1] (method a); the generator's [0, 1] output is mapped
back onto the target's scale with the median (min, max) of the hrT2 volumes it was trained with, so fake
hrT2 has the intensity range real hrT2 has after the engine's normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from safetensors.torch import load_file, save_file

from VSCochleaSegLib.inference import cpu_has_fast_bf16, neighbour_slices, resolve_device
from VSCochleaSegLib.model_folder import NetworkSpec
from VSCochleaSegLib.networks import build_network, inference_state_dict, load_inference_state_dict

from .data import minmax
from .networks import UNetGenerator

FORMAT = "vscochleaseg-translator"
FORMAT_VERSION = 1
WEIGHTS_FILE = "translator.safetensors"
META_FILE = "translator.json"


def _state_dict(net: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in net.state_dict().items()}


class Translator:
    """Generator snapshots keyed by training iteration, plus an optional segmenter.

    ``meta`` holds ``model``, ``dims``, ``image_size``, ``generator`` (:class:`UNetGenerator` kwargs),
    ``target_range`` ([lo, hi] the [0, 1] output maps to), ``segmenter`` (None, or
    ``{"kind": "generator_head", "generator": kwargs}`` / ``{"kind": "dynunet", "network": NetworkSpec dict}``)
    and ``config`` (the :class:`TranslationConfig` as a dict).
    """

    def __init__(self, meta: dict, generators: dict, segmenter: dict | None = None, device: str = "auto",
                 batch_slices: int = 16):
        self.meta = dict(meta)
        self._states = {int(k): v for k, v in generators.items()}
        if not self._states:
            raise ValueError("a translator needs at least one generator snapshot")
        self._segmenter_state = segmenter
        self.device = resolve_device(device)
        precision = self.meta.get("config", {}).get("precision", "auto")
        self.use_bf16 = (precision == "bf16") if precision != "auto" else (self.device.type == "cpu" and cpu_has_fast_bf16())
        self.batch_slices = batch_slices
        self._nets: dict = {}

    @property
    def snapshots(self) -> list[int]:
        """Training iterations at which generators were saved, ascending; the last is the final one."""
        return sorted(self._states)

    @property
    def dims(self) -> int:
        return int(self.meta["dims"])

    @property
    def slab(self) -> int:
        """Axial slices a 2.5D (slab) translator reads and writes at once; 1 for plain 2D and 3D."""
        return int(self.meta["generator"].get("out_channels", 1))

    @property
    def conditioned(self) -> bool:
        """True when the generator also reads the VS mask (``condition_on_vs``): translate with ``vs_mask``."""
        return int(self.meta["generator"].get("in_channels", 1)) > self.slab

    # ------------------------------------------------------------------ networks

    def _generator(self, snapshot: int) -> UNetGenerator:
        key = ("G", snapshot)
        if key not in self._nets:
            net = UNetGenerator(**self.meta["generator"])
            net.load_state_dict(self._states[snapshot])
            self._nets[key] = net.to(self.device).eval()
        return self._nets[key]

    def _segmenter(self):
        seg = self.meta.get("segmenter")
        if seg is None or self._segmenter_state is None:
            return None, 1
        if "S" not in self._nets:
            if seg["kind"] == "generator_head":
                net = UNetGenerator(**seg["generator"])
                net.load_state_dict(self._segmenter_state)
                self._nets["S"] = (net.to(self.device).eval(), 1, net.segment)
            elif seg["kind"] == "dynunet":
                spec = NetworkSpec.from_dict(seg["network"], source=META_FILE, field="segmenter.network")
                net = build_network(spec)
                load_inference_state_dict(net, self._segmenter_state)
                net = net.to(self.device).eval()
                self._nets["S"] = (net, spec.total_stride_zyx, net)
            else:
                raise ValueError(f"unknown segmenter kind {seg['kind']!r} in {META_FILE}")
        _, multiple, fn = self._nets["S"]
        return fn, multiple

    # ------------------------------------------------------------------ inference

    def _run(self, fn, volume01: np.ndarray, multiple=1, extra: np.ndarray | None = None) -> np.ndarray:
        """Apply ``fn`` ((B, slab, *spatial) → (B, C, *spatial)) to a [0, 1] volume: slice by slice in 2D (each
        slice with its :func:`neighbour_slices` for a slab translator), by sliding windows of the training patch
        size in 3D. ``extra`` (z, y, x), e.g. a VS mask, joins as one more input channel (its centre slice in 2D).
        Returns (C, z, y, x) float32."""
        x = torch.from_numpy(np.ascontiguousarray(volume01, dtype=np.float32))
        if extra is not None:
            if extra.shape != volume01.shape:
                raise ValueError(f"the extra channel's shape {extra.shape} differs from the volume's {volume01.shape}")
            e = torch.from_numpy(np.ascontiguousarray(extra, dtype=np.float32))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            if self.dims == 3:
                roi = tuple(self.meta["image_size"])
                channels = x[None] if extra is None else torch.stack([x, e])  # (C, z, y, x)
                out = sliding_window_inference(channels[None].to(self.device), roi, 1, lambda t: fn(t).float(),
                                               overlap=0.25, mode="gaussian")
                return out[0].float().cpu().numpy()
            multiple = (multiple,) * 2 if isinstance(multiple, int) else tuple(multiple)
            h, w = x.shape[1:]
            pad = [(-s) % m for s, m in zip((h, w), multiple)]
            slabs = torch.from_numpy(neighbour_slices(np.arange(x.shape[0]), self.slab, x.shape[0]))
            outs = []
            for start in range(0, x.shape[0], self.batch_slices):
                batch = x[slabs[start:start + self.batch_slices]]  # (B, slab, y, x)
                if extra is not None:
                    batch = torch.cat([batch, e[start:start + self.batch_slices, None]], dim=1)
                batch = batch.to(self.device)
                if any(pad):
                    batch = F.pad(batch, (0, pad[1], 0, pad[0]), mode="replicate")
                outs.append(fn(batch)[..., :h, :w].float().cpu())
            return torch.cat(outs).transpose(0, 1).numpy()

    def translate_volume(self, volume_zyx: np.ndarray, snapshot: int | None = None,
                         vs_mask: np.ndarray | None = None) -> np.ndarray:
        """Source (ceT1) volume → fake target (hrT2), same shape, float32 on the target's intensity scale.

        ``snapshot``: a training iteration from :attr:`snapshots` (default: the last). ``vs_mask`` (z, y, x) bool:
        the source's VS label, needed by a :attr:`conditioned` translator and refused by any other.
        """
        snapshot = self.snapshots[-1] if snapshot is None else int(snapshot)
        if snapshot not in self._states:
            raise KeyError(f"no generator snapshot at iteration {snapshot}; have {self.snapshots}")
        volume = np.asarray(volume_zyx)
        if volume.ndim != 3:
            raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
        if self.conditioned != (vs_mask is not None):
            raise ValueError("this translator reads the VS mask: pass vs_mask=(labels == VS)" if self.conditioned
                             else "this translator does not read a VS mask (it was trained without condition_on_vs)")
        extra = None if vs_mask is None else np.asarray(vs_mask, dtype=np.float32)
        generator, centre = self._generator(snapshot), self.slab // 2  # a slab translator keeps its centre slice
        out01 = self._run(lambda t: generator(t)[:, centre:centre + 1], minmax(volume), extra=extra)[0]
        lo, hi = self.meta["target_range"]
        return (np.clip(out01, 0.0, 1.0) * (hi - lo) + lo).astype(np.float32)

    def segment_volume(self, volume_zyx: np.ndarray) -> np.ndarray | None:
        """Labels (z, y, x) uint8 {0, 1, 2} of a real target (hrT2) volume from the built-in segmenter
        (cyclegan_seg: the hrT2 → ceT1 generator's encoder head; cutseg: its DynUNet), or None (cut)."""
        fn, multiple = self._segmenter()
        if fn is None:
            return None
        volume = np.asarray(volume_zyx)
        if volume.ndim != 3:
            raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
        logits = self._run(fn, minmax(volume), multiple)
        return logits.argmax(0).astype(np.uint8)

    # ------------------------------------------------------------------ files

    def save(self, path) -> Path:
        """Write ``translator.safetensors`` and ``translator.json`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"generator.{it}.{k}": v for it, sd in self._states.items() for k, v in sd.items()}
        if self._segmenter_state is not None:
            tensors.update({f"segmenter.{k}": v for k, v in self._segmenter_state.items()})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta, "snapshots": self.snapshots}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path / WEIGHTS_FILE)
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path, device: str = "auto") -> Translator:
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path / META_FILE} is not a {FORMAT} v{FORMAT_VERSION} file")
        tensors = load_file(str(path / WEIGHTS_FILE))
        generators: dict = {int(it): {} for it in meta["snapshots"]}
        segmenter: dict = {}
        for key, value in tensors.items():
            kind, rest = key.split(".", 1)
            if kind == "generator":
                it, name = rest.split(".", 1)
                generators[int(it)][name] = value
            else:
                segmenter[rest] = value
        return cls(meta, generators, segmenter or None, device=device)

    @classmethod
    def from_model(cls, model, meta: dict, snapshot_states: dict, device: str = "auto") -> Translator:
        """Build from a trained :class:`~training.translation.models.TranslationModel` and its snapshots."""
        seg_net = model.segmenter()
        meta = dict(meta)
        if seg_net is None:
            meta["segmenter"], seg_state = None, None
        elif isinstance(seg_net, UNetGenerator):
            from .models import N_CLASSES, generator_kwargs

            meta["segmenter"] = {"kind": "generator_head", "generator": generator_kwargs(model.cfg, N_CLASSES)}
            seg_state = _state_dict(seg_net)
        else:
            meta["segmenter"] = {"kind": "dynunet", "network": model.seg_spec}
            seg_state = inference_state_dict(seg_net)
        return cls(meta, snapshot_states, seg_state, device=device)
