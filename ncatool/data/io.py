"""Read and write images with their geometry.

One module for every format ncatool touches. SimpleITK does the reading and writing (NIfTI, NRRD,
MHA/MHD, PNG, JPG, BMP, TIFF), so geometry always follows one convention:

* ``array`` is in SimpleITK's NumPy order: ``(Z, Y, X)`` for 3D, ``(Y, X)`` for 2D, with a trailing
  component axis for vector images (e.g. RGB PNG: ``(Y, X, 3)``).
* ``spacing`` and ``origin`` are in physical ``(x, y, z)`` order (millimetres), ``direction`` is the
  row-major flattened direction-cosine matrix, exactly as SimpleITK reports them.

Float NIfTI voxels are taken as stored: ITK's NIfTI reader (niftilib) silently turns NaN and Inf
into 0, which would hide broken images from every check, so :func:`read_image` reads the voxels of
an unscaled float NIfTI file with nibabel and its geometry with SimpleITK (same cost as one read).

Writes go to a temporary name in the destination folder and are then renamed, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ncatool.errors import NcaError

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Extensions we read/write, longest first so ``.nii.gz`` wins over ``.gz``.
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PLANAR_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUPPORTED_EXTENSIONS: tuple[str, ...] = VOLUME_EXTENSIONS + PLANAR_EXTENSIONS
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


def split_extension(path: str | Path) -> tuple[str, str]:
    """Split a file name into stem and a (possibly double) extension.

    Args:
        path: A file path such as ``case_001.nii.gz``.

    Returns:
        ``(stem, extension)`` with the extension lower-cased, e.g. ``("case_001", ".nii.gz")``;
        extension is ``""`` for an unsupported suffix.
    """
    name = Path(path).name
    lower = name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return Path(name).stem, ""


def is_image_file(path: str | Path) -> bool:
    """True if the file has an extension ncatool can read."""
    return split_extension(path)[1] != "" and not Path(path).name.startswith(".")


@dataclass
class Image:
    """An image array together with its physical geometry.

    Attributes:
        array: Pixel data, ``(Z, Y, X)`` or ``(Y, X)``, plus a trailing component axis for vector
            images.
        spacing: Voxel size in mm, ``(x, y[, z])``.
        origin: Physical position of the first voxel, ``(x, y[, z])``.
        direction: Flattened row-major direction cosines (4 values in 2D, 9 in 3D).
        is_vector: True if the last array axis holds components (RGB etc.), not space.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    is_vector: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3; 4 for a 4D file)."""
        return len(self.spacing)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes in array order."""
        return tuple(self.array.shape[:-1] if self.is_vector else self.array.shape)

    @property
    def components(self) -> int:
        """Number of components per pixel (3 for RGB, 1 for scalar)."""
        return int(self.array.shape[-1]) if self.is_vector else 1

    def with_array(self, array: np.ndarray, is_vector: bool | None = None) -> Image:
        """A copy of this geometry with another array of the same spatial shape."""
        return Image(
            array=array,
            spacing=self.spacing,
            origin=self.origin,
            direction=self.direction,
            is_vector=self.is_vector if is_vector is None else is_vector,
        )

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: tuple[float, ...] | None = None,
        origin: tuple[float, ...] | None = None,
        direction: tuple[float, ...] | None = None,
        is_vector: bool = False,
    ) -> Image:
        """Wrap an array with default (identity) geometry where none is given."""
        nd = array.ndim - (1 if is_vector else 0)
        return cls(
            array=array,
            spacing=tuple(float(s) for s in (spacing or (1.0,) * nd)),
            origin=tuple(float(o) for o in (origin or (0.0,) * nd)),
            direction=tuple(float(d) for d in (direction or np.eye(nd).ravel())),
            is_vector=is_vector,
        )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise NcaError("file does not exist", path)
    if path.is_dir():
        raise NcaError("is a folder, expected an image file", path)
    if path.stat().st_size == 0:
        raise NcaError("file is empty (0 bytes)", path)
    if split_extension(path)[1] == "":
        raise NcaError(f"unsupported file type; supported: {', '.join(SUPPORTED_EXTENSIONS)}", path)


def read_image(path: str | Path) -> Image:
    """Read an image file with its geometry.

    Args:
        path: A NIfTI, NRRD, MHA/MHD, PNG, JPG, BMP or TIFF file.

    Returns:
        The :class:`Image`; ``array`` in SimpleITK order (see module docstring).

    Raises:
        NcaError: The file is missing, empty, of an unsupported type or unreadable.
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if split_extension(path)[1] in NIFTI_EXTENSIONS:
            reader.ReadImageInformation()
            stored = _stored_nifti_floats(path, reader)
            if stored is not None:
                return Image(
                    array=stored,
                    spacing=tuple(float(s) for s in reader.GetSpacing()),
                    origin=tuple(float(o) for o in reader.GetOrigin()),
                    direction=tuple(float(d) for d in reader.GetDirection()),
                )
        img = reader.Execute()
    except RuntimeError as err:
        raise NcaError(f"cannot read image ({_sitk_detail(err)})", path) from err
    return _from_sitk(img)


def read_header(path: str | Path) -> tuple[tuple[int, ...], int]:
    """``(size in (x, y[, z]) order, components per pixel)`` from an image file's header only.

    Raises:
        NcaError: The file is missing, empty, of an unsupported type or unreadable.
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise NcaError(f"cannot read image header ({_sitk_detail(err)})", path) from err
    return tuple(int(n) for n in reader.GetSize()), int(reader.GetNumberOfComponents())


def _sitk_detail(err: RuntimeError) -> str:
    lines = str(err).strip().splitlines()
    detail = next((line for line in lines if "ERROR" in line or "rror" in line), "")
    return detail.strip() or "unreadable or corrupt"


def _stored_nifti_floats(path: Path, reader: sitk.ImageFileReader) -> np.ndarray | None:
    """The float voxels of a NIfTI file as stored (NaN/Inf kept), or None to read it with SimpleITK.

    Only unscaled scalar float32/float64 files whose nibabel shape matches ITK's header are taken
    this way; everything else (integers, scaled data, vectors, odd headers) goes through SimpleITK.

    Returns:
        ``(Z, Y, X)`` or ``(Y, X)``, C-contiguous, native byte order, SimpleITK's dtype.
    """
    import nibabel as nib
    import SimpleITK as sitk

    dtypes = {sitk.sitkFloat32: np.dtype(np.float32), sitk.sitkFloat64: np.dtype(np.float64)}
    expected = dtypes.get(reader.GetPixelID())
    if expected is None or reader.GetNumberOfComponents() != 1:
        return None
    try:
        stored = nib.load(str(path), mmap=False)  # a copy, not a view that keeps the file open
        header = stored.header
        slope, inter = header.get_slope_inter()  # type: ignore[attr-defined]
        if header.get_data_dtype().newbyteorder("=") != expected:
            return None
        if slope not in (None, 1.0) or inter not in (None, 0.0):
            return None
        if path.name.lower().endswith(".gz"):
            # one gzip.decompress is ~1.3x faster than nibabel's streaming read of the same file
            stored = type(stored).from_bytes(gzip.decompress(path.read_bytes()))  # type: ignore[attr-defined]
        array = np.asarray(stored.dataobj)  # type: ignore[attr-defined]
    except Exception:  # nibabel cannot parse what ITK could: let SimpleITK read it
        return None
    size = tuple(int(n) for n in reader.GetSize())
    # nibabel keeps trailing singleton axes (a 3D file stored with dim[4] = 1) that ITK drops
    if tuple(array.shape[: len(size)]) != size or any(n != 1 for n in array.shape[len(size) :]):
        return None
    # NIfTI stores x fastest: nibabel's (x, y, z) array transposed is SimpleITK's (z, y, x) order
    return np.ascontiguousarray(array.reshape(size).T, dtype=expected)


def _from_sitk(img: sitk.Image) -> Image:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(img)
    return Image(
        array=array,
        spacing=tuple(float(s) for s in img.GetSpacing()),
        origin=tuple(float(o) for o in img.GetOrigin()),
        direction=tuple(float(d) for d in img.GetDirection()),
        is_vector=img.GetNumberOfComponentsPerPixel() > 1,
    )


def to_sitk(image: Image) -> sitk.Image:
    """Convert an :class:`Image` to a ``SimpleITK.Image`` with the same geometry."""
    import SimpleITK as sitk

    array = image.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=image.is_vector)
    img.SetSpacing(tuple(float(s) for s in image.spacing))
    img.SetOrigin(tuple(float(o) for o in image.origin))
    img.SetDirection(tuple(float(d) for d in image.direction))
    return img


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that is renamed to ``path`` when the block succeeds.

    The temporary name keeps the extension (SimpleITK picks the writer from it) and starts with a
    dot so folder listings and globbing skip it. On error it is removed and ``path`` is untouched.

    Args:
        path: The final destination.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    _, ext = split_extension(path)
    ext = ext or "".join(path.suffixes)
    tmp = path.with_name(f".{path.name[: len(path.name) - len(ext)]}.tmp-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:  # disk full, permission denied, read-only: name the output, not the temporary
        if isinstance(err.filename, str) and Path(err.filename) not in (tmp, path):
            raise  # about another file (e.g. a source being read): its own message names it
        raise NcaError(f"cannot write: {err.strerror or err}", path) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def write_image(image: Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image atomically (temporary name, then rename).

    Args:
        image: The image and its geometry.
        path: Destination; the extension picks the format (``.nii.gz``, ``.nrrd``, ``.mha``, ``.png``).
        compress: Use compression where the format supports it.

    Returns:
        The written path.
    """
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = to_sitk(image)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=compress)
        except RuntimeError as err:
            raise NcaError(f"cannot write image: {str(err).strip().splitlines()[-1]}", path) from err
        # ITK's NIfTI writer only prints "wrote only 0 of N bytes" when the disk fills up, and the
        # truncated file still reads: a full disk after the write means the image may be cut short
        if shutil.disk_usage(tmp.parent).free == 0:
            raise NcaError(f"cannot write image: {os.strerror(errno.ENOSPC)}", path)
    return path


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write bytes to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write text (UTF-8) to ``path`` through a temporary sibling and a rename."""
    return write_bytes_atomic(text.encode("utf-8"), path)
