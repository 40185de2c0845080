"""nnU-Net v2 raw datasets, one file per stage (as nnU-Net splits its own package):

* :mod:`~ncatool.data.nnunet.layout` — folder and file names, and listing the cases of a folder;
* :mod:`~ncatool.data.nnunet.dataset_json` — the one ``dataset.json`` reader (nnU-Net's rules) and writer;
* :mod:`~ncatool.data.nnunet.verify` — the integrity rules per case and ``ncatool verify`` over a dataset
  (training applies the same rules to each case it loads, see :mod:`ncatool.data.loading`);
* :mod:`~ncatool.data.nnunet.pairs` — raw image/label pairs: finding them and checking each;
* :mod:`~ncatool.data.nnunet.prepare` — ``ncatool prepare``: checked pairs → a dataset folder, atomically.
"""
