"""VSCochleaSeg engine: vestibular schwannoma (VS) and cochlea segmentation on hrT2 MRI.

Pure Python (no Slicer, no Qt). The data path flows one way:
read (``io``) → orient/resample (``geometry``) → localise the inner ears (``localise``) →
predict crops (``inference``) → fuse members (``fusion``) → post-process (``postprocess``) →
map back to the input grid → measure (``measure``) / write.

Labels follow CrossMoDA: 0 background, 1 VS, 2 cochlea.
"""

__version__ = "0.1.0"
