"""Choosing both ears from the localiser's cochlea probability: anatomically plausible pairs, weak peaks,
mirroring. Hand-made probability volumes on a 2 mm LPS grid (x = 2 × column index, mm)."""

from __future__ import annotations

import numpy as np
import pytest

from VSCochleaSegLib.errors import InputError
from VSCochleaSegLib.geometry import GridSpec
from VSCochleaSegLib.localise import ears_from_probabilities, plausible_cochlea_pair

GRID = GridSpec((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (80, 60, 30))  # 160 × 120 × 60 mm
LEFT_IJK, RIGHT_IJK = (57, 30, 15), (22, 30, 15)  # x = 114 mm and 44 mm: 70 mm apart, same y and z


def volumes():
    head = np.zeros(GRID.shape_zyx, np.float32)
    head[:, :, 5:75] = 1.0  # head centred at column 39.5 → midline x = 79 mm
    return np.zeros(GRID.shape_zyx, np.float32), head


def blob(prob, ijk, value=0.9, r=1):
    i, j, k = ijk
    prob[k - r:k + r + 1, j - r:j + r + 1, i - r:i + r + 1] = value


def lps(ijk):
    return np.array(ijk, float) * 2.0


def test_plausible_pair_needs_adult_distance_and_a_left_right_line():
    assert plausible_cochlea_pair([35.0, 0, 0], [-35.0, 0, 0])
    assert plausible_cochlea_pair([35.0, 10.0, 5.0], [-35.0, 0, 0])  # ~9° of head rotation
    assert not plausible_cochlea_pair([15.0, 0, 0], [-15.0, 0, 0])  # 30 mm: too close
    assert not plausible_cochlea_pair([35.0, 35.0, 0], [-35.0, 0, 0])  # 27° off the left-right axis
    assert not plausible_cochlea_pair([-35.0, 0, 0], [35.0, 0, 0])  # "left" is on the right


def test_a_strong_false_detection_without_a_partner_loses_to_the_weaker_true_pair():
    prob, head = volumes()
    blob(prob, LEFT_IJK, 0.6, r=0)
    blob(prob, (LEFT_IJK[0] - 1, LEFT_IJK[1], LEFT_IJK[2]), 0.6, r=0)
    blob(prob, (LEFT_IJK[0], LEFT_IJK[1] + 1, LEFT_IJK[2]), 0.6, r=0)
    blob(prob, (LEFT_IJK[0], LEFT_IJK[1], LEFT_IJK[2] + 1), 0.6, r=0)  # true left: mass 2.4
    blob(prob, RIGHT_IJK)  # true right: mass 24
    blob(prob, (LEFT_IJK[0], LEFT_IJK[1] + 15, LEFT_IJK[2]))  # 30 mm behind the left cochlea: mass 24
    ears = ears_from_probabilities(prob, head, GRID)
    assert not ears.mirrored and not ears.warnings
    assert np.linalg.norm(ears.cochlea_lps["left"] - lps(LEFT_IJK)) < 2.0
    assert np.linalg.norm(ears.cochlea_lps["right"] - lps(RIGHT_IJK)) < 1e-3


def test_a_weak_peak_near_the_mirror_image_is_taken_as_the_missing_ear():
    prob, head = volumes()
    blob(prob, LEFT_IJK)
    weak = (RIGHT_IJK[0] - 3, RIGHT_IJK[1] + 2, RIGHT_IJK[2])  # 7 mm from the mirror image of the left ear
    blob(prob, weak, 0.3)
    ears = ears_from_probabilities(prob, head, GRID)
    assert not ears.mirrored
    assert np.linalg.norm(ears.cochlea_lps["right"] - lps(weak)) < 1e-3
    assert any("weakly" in w for w in ears.warnings)


def test_without_any_partner_the_missing_ear_is_mirrored_across_the_head_midline_and_flagged():
    prob, head = volumes()
    blob(prob, RIGHT_IJK)
    blob(prob, (RIGHT_IJK[0] + 12, RIGHT_IJK[1], RIGHT_IJK[2]), 0.8)  # 24 mm medial: too close to be the left ear
    ears = ears_from_probabilities(prob, head, GRID)
    assert ears.mirrored == {"left": True}
    assert ears.cochlea_lps["left"][0] == pytest.approx(2 * 79.0 - 44.0)
    assert ears.warnings


def test_no_detection_at_all_is_refused_with_a_message_about_the_field_of_view():
    prob, head = volumes()
    with pytest.raises(InputError, match="field of view"):
        ears_from_probabilities(prob, head, GRID)
