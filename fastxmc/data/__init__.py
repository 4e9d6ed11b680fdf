"""Datasets for fastxmc.

- :mod:`fastxmc.data.folder`: the ``folder`` on-disk format (images + ``captions.jsonl``).
- :mod:`fastxmc.data.shapes`: the embedded, seeded synthetic captioned dataset (coloured shapes
  on textured backgrounds), written once to a cache directory in the ``folder`` format.
"""
