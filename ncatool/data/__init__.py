"""Data in and out, one module per stage (nnU-Net's raw format is the dataset format throughout).

* :mod:`~ncatool.data.io` — read/write images with their geometry (SimpleITK; float NIfTI voxels as
  stored, NaN kept), atomic writes;
* :mod:`~ncatool.data.mock` — synthetic shapes → image/label pairs (``ncatool mock-data``);
* :mod:`~ncatool.data.nnunet` — the raw dataset: layout, ``dataset.json``, integrity rules and
  ``verify``, raw pairs, ``prepare``;
* :mod:`~ncatool.data.tiles` — cutting cases into spatially separate tiles (``prepare --tile``);
* :mod:`~ncatool.data.splits` — the one seeded held-out split (prepare's test set, train's validation
  set, the digits split);
* :mod:`~ncatool.data.loading` — case records, loading a case with the integrity rules, normalisation;
* :mod:`~ncatool.data.transforms` — resizing, patches, flips, rotations, one-hot targets;
* :mod:`~ncatool.data.datasets` — the torch Datasets that training iterates.
"""
