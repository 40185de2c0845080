"""Pictures of NCA states, shared by ``ncatool animate``, the training sample pictures and plots.

Everything here works on numpy arrays ``(H, W, 3)`` uint8 (RGB) and knows nothing of tasks or models:

* :mod:`ncatool.viz.colour`: values → RGB (gray windows, label overlays, hidden channels, RGBA).
* :mod:`ncatool.viz.grid`: tiles → one picture (:func:`~ncatool.viz.grid.tile_grid`), and the one PNG
  writer (:func:`~ncatool.viz.grid.write_png`, atomic).
* :mod:`ncatool.viz.volume`: which 2D slices of a 3D volume are shown.
* :mod:`ncatool.viz.text`: the header line with the step label of an animation frame.
* :mod:`ncatool.viz.writers`: frames → GIF, MP4 (ffmpeg) or a folder of PNGs.

The modules import only numpy (and Pillow, torch or ffmpeg where a function needs them), so a task
module can draw its pictures without importing the animation machinery.
"""
