"""Label values (CrossMoDA convention), display names and colours shared by the engine and Slicer glue."""

from __future__ import annotations

BACKGROUND = 0
VS = 1
COCHLEA = 2

LABEL_NAMES = {BACKGROUND: "background", VS: "vs", COCHLEA: "cochlea"}
DISPLAY_NAMES = {VS: "Vestibular schwannoma", COCHLEA: "Cochlea"}
# RGB in [0, 1]; VS in a tumour yellow-orange, cochlea in an inner-ear blue-green.
COLOURS = {VS: (0.92, 0.62, 0.15), COCHLEA: (0.20, 0.70, 0.85)}
