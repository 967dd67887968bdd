"""Reading and writing NIfTI images, and reorienting them to RAS+ and back.

Pure Python on top of nibabel, numpy and torch; no kernel is involved.

Public API
----------
``load_nifti(path, *, as_tensor=True, dtype=None, canonical=False) -> NiftiImage``
``save_nifti(data, affine, path, *, header=None, dtype=None, like=None, overwrite=False) -> str``
``to_ras(img) -> NiftiImage``                       (the result carries ``.reorientation``)
``from_ras(data, img_or_orientation) -> (data, affine)``
``NiftiImage``, ``Reorientation``, ``SourceOverwriteError``

Decisions (what a MONAI / nnU-Net user expects)
-----------------------------------------------
* **Layout.** ``NiftiImage.data`` keeps the axis order nibabel gives, ``(X, Y, Z[, t, c, ...])``:
  spatial axes first, any 4th/5th... axis trailing, nothing moved to the front. (A MONAI user who
  wants channel-first moves it with ``data.movedim(-1, 0)``.) The array is C-contiguous in memory
  (like MONAI's ``NibabelReader``), so ``torch.from_numpy`` gives an ordinary contiguous tensor.
* **Scaling.** ``scl_slope``/``scl_inter`` are *applied*, as ``np.asanyarray(img.dataobj)`` does
  (which is what MONAI's reader uses): you get the real values. When the file has no scaling (or
  the identity), the on-disk dtype is kept, so an integer label map stays integer (``uint8`` stays
  ``uint8``). When it is scaled, the values are computed in float64 and returned as float32, or as
  float64 when the on-disk type is float64 or a 32/64-bit integer (float32 cannot hold all of
  those). The on-disk dtype is kept in ``NiftiImage.dtype`` and the slope/intercept in the header,
  so ``save_nifti(..., like=img)`` writes the same on-disk type with the same scaling, exactly,
  whenever the values are still representable that way (an integer on-disk type; a float one is
  written unscaled, its values bit-identical).
* **Tensors.** torch has little support for unsigned types wider than 8 bits, so with
  ``as_tensor=True`` uint16 becomes int32 and uint32/uint64 become int64 (``NiftiImage.dtype``
  still says what is on disk). ``dtype=`` (a torch or numpy dtype) casts the data after all that.
* **Affine.** ``NiftiImage.affine`` is a float64 numpy array (4, 4): nibabel's best affine (sform
  if ``sform_code > 0``, else qform, else the pixdim fallback). NIfTI-1 stores it in float32, so a
  round trip through a file is exact to float32, not float64.
* **Spacing.** ``NiftiImage.spacing`` is the header's pixdim of the spatial axes (at most three).
* **Never overwriting a source.** Every file read by ``load_nifti`` is remembered for the life of
  the process, by resolved real path and by file identity (device and inode, so hard links and
  symlinks are caught too). ``save_nifti`` refuses such a file, and the file ``like`` came from,
  *even with* ``overwrite=True`` (:class:`SourceOverwriteError`, a ``FileExistsError``). Any other
  existing path is refused unless ``overwrite=True`` (``FileExistsError``).
* **Atomic writes.** The image is written to a temporary file in the destination directory,
  flushed to disk and then moved into place (``os.link`` when not overwriting, so a file that
  appears meanwhile is not clobbered; ``os.replace`` otherwise). On any error, including
  ``KeyboardInterrupt``, the temporary file is removed and an existing destination is untouched.
* **Header on save.** With ``header``/``like`` the header fields (codes, units, intent,
  description, extensions...) are kept; ``header`` wins over ``like.header``. If the affine is the
  reference header's own affine, the qform/sform fields are kept untouched (bit-identical round
  trip); otherwise both forms are set from ``affine`` with the reference codes (the sform also
  gets the qform's code if the qform code is the only one set and cannot hold the affine's shears;
  if both codes are 0 and the affine is not the pixdim fallback, the sform gets code 2, aligned,
  so that the affine is not lost). Without a reference, qform and sform get code 1 (scanner), as
  ITK/SimpleITK write (qform code 0 if the affine has shears a quaternion cannot hold).
* **On-disk dtype on save.** ``dtype`` > ``like``'s on-disk dtype > ``header``'s > the data's own
  (bool -> uint8, float16/bfloat16 -> float32, int64/uint64 -> int32 when the values fit).
  Integer data must fit an integer on-disk type (``ValueError`` otherwise: labels are never
  rescaled). Float data going to an integer type is written exactly when it is integral and fits,
  or when it is exactly ``raw * slope + inter`` for the reference header's scaling; otherwise
  nibabel chooses ``scl_slope``/``scl_inter`` to cover the range (standard NIfTI scaling, lossy).
* **Errors.** A missing file ``FileNotFoundError``; a directory ``IsADirectoryError``; a corrupt,
  truncated or non-NIfTI file ``ValueError``; a bad argument ``TypeError``/``ValueError``. Every
  message starts with the argument's name (``path``, ``affine``, ``data``...).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import stat
import threading
import warnings
from typing import Any, NamedTuple, Optional, Tuple, Union

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as _ornt

__all__ = [
    "NiftiImage",
    "Reorientation",
    "SourceOverwriteError",
    "load_nifti",
    "save_nifti",
    "to_ras",
    "from_ras",
]

_NIFTI_EXTS = (".nii.gz", ".nii")
_RAS_ORNT = _ornt.axcodes2ornt(("R", "A", "S"))
_MAX_NIFTI_DIMS = 7


class SourceOverwriteError(FileExistsError):
    """Raised by :func:`save_nifti` for a path that would overwrite a file read by :func:`load_nifti`."""


class Reorientation(NamedTuple):
    """What :func:`to_ras` did, so that :func:`from_ras` can undo it exactly.

    ``ornt`` is nibabel's orientation transform (3, 2) from the original voxel axes to RAS+
    (``ornt[i] = [new axis of original axis i, +1 or -1 for a flip]``); ``original_shape`` is the
    original spatial shape (3 ints) and ``original_affine`` the original float64 (4, 4) affine.
    """

    ornt: np.ndarray
    original_shape: Tuple[int, int, int]
    original_affine: np.ndarray

    @property
    def original_axcodes(self) -> Tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.original_affine))

    @property
    def ras_shape(self) -> Tuple[int, int, int]:
        shape = [0, 0, 0]
        for i, (new_axis, _) in enumerate(self.ornt):
            shape[int(new_axis)] = self.original_shape[i]
        return tuple(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class NiftiImage:
    """An image read by :func:`load_nifti` (or produced by :func:`to_ras`).

    Attributes
    ----------
    data : torch.Tensor or np.ndarray
        The voxel values, axes ``(X, Y, Z[, ...])`` as nibabel gives them, scaling applied.
    affine : np.ndarray
        float64 (4, 4) voxel-to-world (RAS+ mm) matrix.
    dtype : np.dtype
        The on-disk data type (native byte order), e.g. ``uint8``, ``int16``.
    header : nibabel Nifti1Header / Nifti2Header
        A private copy of the file's header (including ``scl_slope``/``scl_inter``).
    qform_code, sform_code : int
    spacing : tuple of float
        pixdim of the spatial axes.
    path : str or None
        The resolved absolute path the image was read from.
    reorientation : Reorientation or None
        Set by :func:`to_ras` (and ``load_nifti(canonical=True)``): what undoes the reorientation.
    """

    data: Any = dataclasses.field(repr=False)
    affine: np.ndarray = dataclasses.field(repr=False)
    dtype: np.dtype
    header: Any = dataclasses.field(repr=False)
    qform_code: int
    sform_code: int
    spacing: Tuple[float, ...]
    path: Optional[str]
    reorientation: Optional[Reorientation] = dataclasses.field(default=None, repr=False)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def axcodes(self) -> Tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.affine))

    def __repr__(self) -> str:  # the data and header would drown the useful part
        return (f"NiftiImage(shape={self.shape}, data_dtype={self.data.dtype}, dtype={self.dtype}, "
                f"axcodes={''.join(self.axcodes)}, spacing={self.spacing}, qform_code={self.qform_code}, "
                f"sform_code={self.sform_code}, path={self.path!r}, reoriented={self.reorientation is not None})")


# --------------------------------------------------------------------------------------------
# the registry of files read in this process
# --------------------------------------------------------------------------------------------

_loaded_lock = threading.Lock()
_loaded_realpaths: set = set()
_loaded_ids: set = set()


def _file_id(st: os.stat_result) -> Tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _remember_source(realpath: str, st: os.stat_result) -> None:
    with _loaded_lock:
        _loaded_realpaths.add(os.path.normcase(realpath))
        _loaded_ids.add(_file_id(st))


def _is_protected(path: str, extra_ids: set, extra_paths: set) -> bool:
    real = os.path.normcase(os.path.realpath(path))
    try:
        fid = _file_id(os.stat(path))  # follows symlinks
    except OSError:
        fid = None
    with _loaded_lock:
        if real in _loaded_realpaths or (fid is not None and fid in _loaded_ids):
            return True
    for rel in extra_paths:
        if rel.startswith(_RELATIVE):
            tail = rel[len(_RELATIVE):]
            absn = os.path.normcase(os.path.abspath(path))
            if any(p == tail or p.endswith(os.sep + tail) for p in (real, absn)):
                return True
    return real in extra_paths or (fid is not None and fid in extra_ids)


_RELATIVE = "\0relative:"  # marks a relative source path in _reference's protected paths


# --------------------------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------------------------

def _check_path(path: Any, name: str = "path") -> str:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a str or os.PathLike file name, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{name}: empty file name")
    if "\x00" in path:
        raise ValueError(f"{name}: file name contains a NUL character")
    return path


def _nifti_ext(path: str) -> Optional[str]:
    low = path.lower()
    for ext in _NIFTI_EXTS:
        if low.endswith(ext) and len(os.path.basename(path)) > len(ext):
            return path[-len(ext):]
    return None


def _np_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bfloat16:
            raise TypeError(f"{name}: bfloat16 has no numpy/NIfTI equivalent; use torch.float32")
        if dtype == torch.bool:
            return np.dtype(np.bool_)
        try:
            return torch.empty(0, dtype=dtype).numpy().dtype
        except (TypeError, RuntimeError) as exc:
            raise TypeError(f"{name}: {dtype} has no numpy equivalent") from exc
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name}: not a dtype: {dtype!r}") from exc


def _torch_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    npd = _np_dtype(dtype, name)
    try:
        return torch.from_numpy(np.empty(0, dtype=npd)).dtype
    except TypeError as exc:
        raise TypeError(f"{name}: {npd} has no torch equivalent") from exc


def _native(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    return dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt


def _check_affine(affine: Any, name: str = "affine") -> np.ndarray:
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().double().numpy()
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a (4, 4) array of numbers, got {type(affine).__name__}") from exc
    if a.shape != (4, 4):
        raise ValueError(f"{name}: expected shape (4, 4), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinity:\n{a}")
    if not np.array_equal(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name}: last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    rzs = a[:3, :3]
    norms = np.linalg.norm(rzs, axis=0)
    if np.any(norms == 0) or not np.isfinite(np.linalg.cond(rzs / norms)) or np.linalg.cond(rzs / norms) > 1e8:
        raise ValueError(f"{name}: the 3x3 part is singular (not invertible):\n{a}")
    return a.copy()


def _check_ndim(data: Any, name: str, min_ndim: int, max_ndim: int) -> None:
    nd = data.ndim
    if nd < min_ndim or nd > max_ndim:
        raise ValueError(f"{name}: expected {min_ndim} to {max_ndim} dimensions (X, Y, Z[, ...]), "
                         f"got {nd} (shape {tuple(data.shape)})")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _scaled_float_dtype(raw: np.dtype) -> np.dtype:
    if raw == np.float64 or (raw.kind in "iu" and raw.itemsize >= 4):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _to_tensor(arr: np.ndarray, name: str) -> torch.Tensor:
    widen = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}
    if arr.dtype in widen:
        arr = arr.astype(widen[arr.dtype])
    elif arr.dtype == np.uint64:
        if arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: uint64 values above 2**63-1 do not fit a torch int64 tensor; use as_tensor=False")
        arr = arr.astype(np.int64)
    elif arr.dtype.fields is not None or arr.dtype.kind not in "biufc":
        raise ValueError(f"{name}: the on-disk type {arr.dtype} (e.g. RGB) has no torch equivalent; use as_tensor=False")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _create_temp(directory: str, prefix: str, suffix: str) -> str:
    """A new empty file with a unique name, created with mode 0o666 so that the process umask applies
    (no chmod afterwards, no umask juggling)."""
    for _ in range(100):
        name = os.path.join(directory, prefix + os.urandom(6).hex() + suffix)
        try:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(errno.EEXIST, f"path: no free temporary name in {directory!r}", directory)


def _link_new(tmp: str, path: str, exists_msg: str) -> None:
    """Move the finished temporary file ``tmp`` to ``path``, which must not exist: ``os.link`` is
    atomic and fails if the destination appeared meanwhile (then ``tmp`` is left for the caller to
    remove); on a file system without hard links, a last existence check and ``os.replace``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, exists_msg, path) from None
    except OSError:  # file system without hard links
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, exists_msg, path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def _image_from_nibabel(img: Any, path: Optional[str], *, as_tensor: bool, dtype: Any, name: str) -> NiftiImage:
    header = img.header.copy()
    ondisk = _native(header.get_data_dtype())
    try:
        slope, inter = img.dataobj.slope, img.dataobj.inter  # ArrayProxy: NaN/0 already mapped to 1/0
    except AttributeError:
        slope, inter = 1.0, 0.0
    scaled = not (float(slope) == 1.0 and float(inter) == 0.0)
    if scaled:  # nibabel "consumes" the scaling fields when it loads; put them back in our copy
        header.set_slope_inter(float(slope), float(inter))
    try:
        arr = np.asanyarray(img.dataobj)
    except MemoryError as exc:  # a corrupt header can claim an enormous shape
        raise MemoryError(f"{name}: {path or 'the image'} claims shape {tuple(img.shape)} of {ondisk}, more than "
                          f"can be allocated (corrupt header?)") from exc
    except Exception as exc:  # truncated or corrupt data block (EOFError, zlib.error, OSError, ValueError...)
        raise ValueError(f"{name}: cannot read the image data of {path or 'the image'} "
                         f"(truncated or corrupt file?): {type(exc).__name__}: {exc}") from exc
    if scaled:
        arr = arr.astype(_scaled_float_dtype(ondisk), copy=False)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(_native(arr.dtype))
    if as_tensor:
        data = _to_tensor(arr, name)
        if dtype is not None:
            data = data.to(_torch_dtype(dtype))
    else:
        data = arr if dtype is None else arr.astype(_np_dtype(dtype))
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    nsp = min(3, len(header.get_data_shape()))
    spacing = tuple(float(z) for z in header.get_zooms()[:nsp])
    return NiftiImage(data=data, affine=affine, dtype=ondisk, header=header,
                      qform_code=int(header["qform_code"]), sform_code=int(header["sform_code"]),
                      spacing=spacing, path=path)


def load_nifti(path: Union[str, os.PathLike], *, as_tensor: bool = True, dtype: Any = None,
               canonical: bool = False) -> NiftiImage:
    """Read a ``.nii`` / ``.nii.gz`` file (NIfTI-1 or NIfTI-2) into a :class:`NiftiImage`.

    ``as_tensor``: ``data`` is a CPU torch tensor (default) or a numpy array.
    ``dtype``: cast ``data`` to this torch/numpy dtype (``None`` keeps the type described in the
    module docstring: on-disk type, float32/float64 if the file is scaled).
    ``canonical``: reorient to RAS+ (as :func:`to_ras`); ``.reorientation`` then undoes it.

    The file is remembered: :func:`save_nifti` will never overwrite it.
    """
    path = _check_path(path)
    if not isinstance(as_tensor, bool):
        raise TypeError(f"as_tensor: expected a bool, got {type(as_tensor).__name__}")
    if not isinstance(canonical, bool):
        raise TypeError(f"canonical: expected a bool, got {type(canonical).__name__}")
    if dtype is not None:  # validate before reading anything
        _torch_dtype(dtype) if as_tensor else _np_dtype(dtype)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"path: no such file: {path!r}", path) from None
    except OSError as exc:
        raise ValueError(f"path: cannot access {path!r}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"path: {path!r} is a directory, not a NIfTI file", path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"path: {path!r} is not a regular file")
    if _nifti_ext(path) is None:
        raise ValueError(f"path: {path!r} is not a NIfTI file name (expected .nii or .nii.gz)")
    realpath = os.path.realpath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(path, mmap=False)
    except MemoryError:
        raise
    except PermissionError as exc:
        raise PermissionError(errno.EACCES, f"path: permission denied reading {path!r}", path) from exc
    except Exception as exc:
        raise ValueError(f"path: {path!r} is not a readable NIfTI file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"path: {path!r} is not a single-file NIfTI image (nibabel read it as {type(img).__name__})")
    _remember_source(realpath, st)
    out = _image_from_nibabel(img, realpath, as_tensor=as_tensor, dtype=dtype, name="path")
    return to_ras(out) if canonical else out


# --------------------------------------------------------------------------------------------
# reorientation
# --------------------------------------------------------------------------------------------

def _apply_ornt(data: Any, ornt: np.ndarray) -> Any:
    """Flip then permute the first three axes of ``data`` as ``nibabel.orientations.apply_orientation``."""
    flips = [i for i in range(3) if ornt[i, 1] == -1]
    perm = list(np.argsort(ornt[:, 0])) + list(range(3, data.ndim))
    perm = [int(p) for p in perm]
    if isinstance(data, torch.Tensor):
        out = torch.flip(data, flips) if flips else data
        return out.permute(perm).contiguous()
    out = np.flip(data, axis=tuple(flips)) if flips else data
    return np.ascontiguousarray(np.transpose(out, perm))


def _as_image(img: Any, name: str) -> NiftiImage:
    if isinstance(img, NiftiImage):
        return img
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        fname = img.get_filename()
        return _image_from_nibabel(img, os.path.realpath(fname) if fname else None,
                                   as_tensor=True, dtype=None, name=name)
    raise TypeError(f"{name}: expected a NiftiImage (from load_nifti) or a nibabel NIfTI image, got {type(img).__name__}")


def _check_data_array(data: Any, name: str) -> None:
    if not isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(data).__name__}")


def to_ras(img: Any) -> NiftiImage:
    """Reorient ``img`` (a :class:`NiftiImage` or nibabel NIfTI image) to the closest RAS+ voxel order.

    Only flips and axis permutations are applied (no resampling), so the data values are
    unchanged; trailing (channel/time) axes stay where they are. The returned image has
    ``nib.aff2axcodes(out.affine) == ('R', 'A', 'S')`` (for oblique affines: the closest axes),
    permuted ``spacing``, a header updated to match, and ``out.reorientation`` for
    :func:`from_ras`. An image that was already reoriented by ``to_ras`` is returned as it is.
    """
    img = _as_image(img, "img")
    if img.reorientation is not None:
        return img
    _check_data_array(img.data, "img.data")
    _check_ndim(img.data, "img.data", 3, _MAX_NIFTI_DIMS)
    affine = _check_affine(img.affine, "img.affine")
    start = _ornt.io_orientation(affine)
    if np.any(np.isnan(start)):
        raise ValueError(f"img.affine: cannot tell the orientation of the voxel axes:\n{affine}")
    ornt = _ornt.ornt_transform(start, _RAS_ORNT)
    shape = tuple(int(s) for s in img.data.shape[:3])
    new_affine = affine @ _ornt.inv_ornt_aff(ornt, shape)
    new_data = _apply_ornt(img.data, ornt)
    spacing = (list(img.spacing) + [1.0, 1.0, 1.0])[:3]
    new_spacing = [0.0, 0.0, 0.0]
    for i, (ax, _) in enumerate(ornt):
        new_spacing[int(ax)] = float(spacing[i])
    header = img.header.copy()
    try:
        header.set_data_shape(tuple(new_data.shape))
        if img.sform_code > 0 or img.qform_code > 0:
            header.set_sform(new_affine, code=img.sform_code)
            header.set_qform(new_affine, code=img.qform_code)
    except Exception:  # header bookkeeping only; the data and affine above are what matter
        pass
    reo = Reorientation(ornt=ornt, original_shape=shape, original_affine=affine)
    return dataclasses.replace(img, data=new_data, affine=new_affine, header=header,
                               spacing=tuple(new_spacing),
                               reorientation=reo)


def from_ras(data: Any, img_or_orientation: Any) -> Tuple[Any, np.ndarray]:
    """Map RAS+-ordered ``data`` back to the original voxel order; returns ``(data, original_affine)``.

    ``img_or_orientation`` is the image returned by :func:`to_ras` (or ``load_nifti(...,
    canonical=True)``), its :class:`Reorientation`, or the *original* (not reoriented) image.
    ``data`` (torch tensor or numpy array, same type returned) has axes ``(X, Y, Z[, ...])`` in
    RAS+ order, with the RAS spatial shape; any trailing axes are carried along. The data are
    only flipped and permuted, so ``from_ras(to_ras(img).data, ...)`` equals ``img.data`` exactly,
    and the returned affine is the stored original one (a copy).
    """
    if isinstance(img_or_orientation, Reorientation):
        reo = img_or_orientation
    elif isinstance(img_or_orientation, (NiftiImage, nib.Nifti1Image, nib.Nifti2Image)):
        im = _as_image(img_or_orientation, "img_or_orientation")
        reo = im.reorientation
        if reo is None:
            affine = _check_affine(im.affine, "img_or_orientation.affine")
            start = _ornt.io_orientation(affine)
            if np.any(np.isnan(start)):
                raise ValueError(f"img_or_orientation.affine: cannot tell the orientation of the voxel axes:\n{affine}")
            reo = Reorientation(ornt=_ornt.ornt_transform(start, _RAS_ORNT),
                                original_shape=tuple(int(s) for s in im.shape[:3]), original_affine=affine)
    else:
        raise TypeError("img_or_orientation: expected a NiftiImage, a nibabel NIfTI image or a Reorientation, "
                        f"got {type(img_or_orientation).__name__}")
    _check_data_array(data, "data")
    _check_ndim(data, "data", 3, _MAX_NIFTI_DIMS)
    ornt = np.asarray(reo.ornt)
    if tuple(data.shape[:3]) != tuple(reo.ras_shape):
        raise ValueError(f"data: spatial shape {tuple(data.shape[:3])} does not match the RAS shape "
                         f"{tuple(reo.ras_shape)} of the image (original shape {tuple(reo.original_shape)})")
    inverse = np.zeros_like(ornt)
    for i, (ax, flip) in enumerate(ornt):
        inverse[int(ax)] = [i, flip]
    return _apply_ornt(data, inverse), np.array(reo.original_affine, dtype=np.float64, copy=True)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------

def _data_to_numpy(data: Any) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type == "meta":
            raise ValueError("data: a tensor on the meta device has no values to write")
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if t.layout != torch.strided:
            raise TypeError(f"data: expected a dense (strided) tensor, got layout {t.layout}")
        try:
            arr = t.cpu().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError) as exc:  # quantized, float8, ...: no numpy type
            raise TypeError(f"data: tensors of dtype {t.dtype} cannot be written (no NIfTI type)") from exc
    elif isinstance(data, np.ndarray):
        arr = data
        if not arr.dtype.isnative:  # the dtype rules below compare native types
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
    else:
        raise TypeError(f"data: expected a torch.Tensor or numpy.ndarray, got {type(data).__name__}")
    if arr.dtype.kind not in "biufc" or arr.dtype.fields is not None:
        raise TypeError(f"data: unsupported element type {arr.dtype}")
    return arr


def _reference(header: Any, like: Any) -> Tuple[Any, Optional[np.dtype], set, set]:
    """(reference header or None, like's on-disk dtype or None, protected ids, protected real paths)."""
    ids, paths = set(), set()
    like_dtype = None
    like_header = None
    if like is not None:
        if isinstance(like, NiftiImage):
            like_header, like_dtype, src = like.header, like.dtype, like.path
        elif isinstance(like, (nib.Nifti1Image, nib.Nifti2Image)):
            like_header, like_dtype, src = like.header, _native(like.get_data_dtype()), like.get_filename()
        else:
            raise TypeError(f"like: expected a NiftiImage or a nibabel NIfTI image, got {type(like).__name__}")
        if src:
            paths.add(os.path.normcase(os.path.realpath(src)))
            try:
                ids.add(_file_id(os.stat(src)))
            except OSError:
                pass
            if not os.path.isabs(src):
                # a nibabel image opened by a relative path: after a chdir nobody knows which file
                # it was, so every destination ending in that relative path counts as its source
                parts = os.path.normcase(os.path.normpath(src)).split(os.sep)
                while parts and parts[0] in (os.pardir, os.curdir, ""):  # "../in/ct.nii": in/ct.nii
                    parts.pop(0)
                if parts:
                    paths.add(_RELATIVE + os.sep.join(parts))
    if header is not None:
        if not isinstance(header, nib.Nifti1Header):  # Nifti2Header subclasses Nifti1Header
            if isinstance(header, nib.spatialimages.SpatialHeader) or hasattr(header, "get_data_dtype"):
                try:
                    header = nib.Nifti1Header.from_header(header)
                except Exception as exc:
                    raise TypeError(f"header: cannot convert {type(header).__name__} to a NIfTI header: {exc}") from exc
            else:
                raise TypeError(f"header: expected a nibabel NIfTI header, got {type(header).__name__}")
        ref = header
    else:
        ref = like_header
    return (ref.copy() if ref is not None else None), like_dtype, ids, paths


def _default_dtype(arr: np.ndarray) -> np.dtype:
    dt = arr.dtype
    if dt == np.bool_:
        return np.dtype(np.uint8)
    if dt in (np.int64, np.uint64):
        if arr.size == 0 or (arr.min() >= np.iinfo(np.int32).min and arr.max() <= np.iinfo(np.int32).max):
            return np.dtype(np.int32)
        return np.dtype(np.int64)
    return _native(dt)


def _prepare_data(arr: np.ndarray, out: np.dtype, slope: float, inter: float) -> Tuple[np.ndarray, Optional[Tuple[float, float]]]:
    """The array to hand to nibabel, and the (slope, inter) to store, or None to let nibabel choose."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if out.kind not in "iu":
        return arr, (1.0, 0.0) if out.kind == "f" else None
    info = np.iinfo(out)
    if arr.dtype.kind in "iub":
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise ValueError(f"data: integer values in [{arr.min()}, {arr.max()}] do not fit the on-disk type {out} "
                             f"[{info.min}, {info.max}]; pass a wider dtype=")
        return arr.astype(out, copy=False), (1.0, 0.0)
    if arr.dtype.kind == "c":
        raise TypeError(f"data: complex values cannot be stored as {out}")
    finite = np.isfinite(arr).all()
    if not finite:
        raise ValueError(f"data: NaN or infinite values cannot be stored in the integer on-disk type {out}; "
                         "replace them first (e.g. numpy.nan_to_num) or pass a floating-point dtype=")
    if np.isfinite(slope) and np.isfinite(inter) and slope != 0 and (slope, inter) != (1.0, 0.0):
        raw = np.rint((arr.astype(np.float64) - inter) / slope)
        if (raw.size == 0 or (raw.min() >= info.min and raw.max() <= info.max)) and \
                np.array_equal((raw * slope + inter).astype(arr.dtype), arr):
            return raw.astype(out), (float(slope), float(inter))
    ints = np.rint(arr)
    if np.array_equal(ints, arr) and (arr.size == 0 or (ints.min() >= info.min and ints.max() <= info.max)):
        return ints.astype(out), (1.0, 0.0)
    return arr, None  # nibabel picks scl_slope / scl_inter


def _build_image(arr: np.ndarray, affine: np.ndarray, ref: Any, out_dtype: np.dtype) -> Any:
    nifti2 = isinstance(ref, nib.Nifti2Header)
    if not nifti2 and max(arr.shape) > 32767:
        raise ValueError(f"data: shape {arr.shape} has a dimension above 32767, which NIfTI-1 cannot store; "
                         "pass header=nibabel.Nifti2Header() to write NIfTI-2 (and dtype=, or a fresh header's "
                         "float32 becomes the on-disk type)")
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    if ref is not None:
        slope, inter = ref.get_slope_inter()
        slope = np.nan if slope is None else float(slope)
        inter = np.nan if inter is None else float(inter)
        if np.isfinite(slope) and np.isnan(inter):
            inter = 0.0
    else:
        slope = inter = np.nan
    data, scaling = _prepare_data(arr, out_dtype, slope, inter)

    if ref is None:
        img = cls(data, affine, dtype=out_dtype)
        hdr = img.header
        hdr.set_sform(affine, code=1)
        hdr.set_qform(affine, code=1)
        if not np.allclose(hdr.get_qform(), affine, rtol=1e-5, atol=1e-4):
            hdr.set_qform(affine, code=0)  # shears: a quaternion cannot hold them
    else:
        ref_affine = ref.get_best_affine()
        qcode, scode = int(ref["qform_code"]), int(ref["sform_code"])
        same = np.allclose(ref_affine, affine, rtol=1e-6, atol=1e-5)
        # the reference's own affine when they agree: nibabel's constructor then leaves the forms and
        # codes alone (given an affine off by more than its own tolerance, it would rewrite them)
        img = cls(data, ref_affine if same else affine, header=ref, dtype=out_dtype)
        hdr = img.header
        if not same:  # else keep the forms untouched
            if qcode == 0 and scode == 0:
                hdr.set_qform(affine, code=0)
                scode = 0 if np.allclose(hdr.get_base_affine(), affine, rtol=1e-6, atol=1e-5) else 2
                hdr.set_sform(affine, code=scode)
            else:
                hdr.set_qform(affine, code=qcode)
                qform_exact = np.allclose(hdr.get_qform(), affine, rtol=1e-5, atol=1e-4)
                if scode == 0 and not qform_exact:
                    scode = qcode
                hdr.set_sform(affine, code=scode)
        # make the image's affine exactly the header's best one, so that nibabel does not redo the header
        img = cls(data, hdr.get_best_affine(), header=hdr, dtype=out_dtype)
    if scaling is not None:
        img.header.set_slope_inter(*scaling)
    return img


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_nifti(data: Any, affine: Any, path: Union[str, os.PathLike], *, header: Any = None, dtype: Any = None,
               like: Any = None, overwrite: bool = False) -> str:
    """Write ``data`` (torch tensor or numpy array, axes ``(X, Y, Z[, ...])``) as a NIfTI file.

    ``affine``: (4, 4) voxel-to-world matrix, finite and invertible; ``None`` takes ``like``'s.
    ``path``: a ``.nii`` or ``.nii.gz`` file name (gzip for ``.nii.gz``) in an existing directory.
    ``header``: a nibabel NIfTI header whose fields and qform/sform codes are kept (a
    ``Nifti2Header`` writes NIfTI-2). ``like``: a :class:`NiftiImage` (or nibabel NIfTI image)
    whose header, codes and on-disk dtype are kept; ``header`` wins over ``like.header``. A
    header taken from a loaded nibabel image has no scaling (nibabel moves ``scl_slope`` /
    ``scl_inter`` to the image's data proxy), so a scaled integer file rewritten with ``header=``
    gets a scaling nibabel chooses (lossy for float data on uint8); ``like=`` the image keeps its
    slope and intercept. ``dtype``: the on-disk type (torch or numpy dtype), default ``like``'s, then ``header``'s,
    then the data's. ``overwrite``: replace an existing file; a file read by :func:`load_nifti`
    or the source of ``like`` is never replaced (:class:`SourceOverwriteError`).

    The write is atomic (temporary file in the same directory, then rename). Returns the path.
    """
    path = _check_path(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
    ext = _nifti_ext(path)
    if ext is None:
        raise ValueError(f"path: {path!r} must end with .nii or .nii.gz")
    arr = _data_to_numpy(data)
    _check_ndim(arr, "data", 1, _MAX_NIFTI_DIMS)
    if 0 in arr.shape:
        raise ValueError(f"data: has an empty dimension (shape {arr.shape}); NIfTI cannot store it")
    ref, like_dtype, extra_ids, extra_paths = _reference(header, like)
    if affine is None:
        if like is None:
            raise ValueError("affine: None is only allowed together with like=")
        affine = like.affine
    affine = _check_affine(affine)
    if dtype is not None:
        out_dtype, origin = _np_dtype(dtype), "dtype"
    elif like_dtype is not None:
        out_dtype, origin = like_dtype, "like"
    elif header is not None:
        out_dtype, origin = _native(ref.get_data_dtype()), "header"
    else:
        out_dtype, origin = _default_dtype(arr), "data"
    out_dtype = _native(out_dtype)
    if out_dtype.fields is not None or out_dtype.kind not in "biufc" or out_dtype.itemsize > 16:
        raise TypeError(f"{origin}: the on-disk type {out_dtype} (e.g. RGB, object) is not supported for writing; "
                        "pass dtype= a numeric type")
    if out_dtype == np.bool_:
        out_dtype = np.dtype(np.uint8)
    if out_dtype == np.float16:
        raise TypeError("dtype: NIfTI has no float16 type; use float32")

    # where we write
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"path: the directory {directory!r} does not exist", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"path: {path!r} is a directory", path)
    if _is_protected(path, extra_ids, extra_paths):
        raise SourceOverwriteError(errno.EEXIST, f"path: {path!r} is (or links to) a file read by load_nifti or the "
                                   "source of like=; fastmed never overwrites an input image, even with overwrite=True",
                                   path)
    exists = os.path.lexists(path)
    if exists and not overwrite:
        raise FileExistsError(errno.EEXIST, f"path: {path!r} already exists; pass overwrite=True to replace it", path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # int64 / qform shear warnings: handled above
            img = _build_image(arr, affine, ref, out_dtype)
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # nibabel HeaderDataError and friends
        raise ValueError(f"{origin}: data cannot be written as NIfTI with the on-disk type {out_dtype}: {exc}") from exc

    base = os.path.basename(path)
    stem = os.fsdecode(os.fsencode(base[: -len(ext)])[:120])  # the temporary name fits wherever path does
    tmp = _create_temp(directory, f".{stem}.", ".tmp" + ext.lower())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.to_filename(tmp)
        _fsync_path(tmp)
        if overwrite:
            # re-check right before the rename: the destination may have become a link to a source
            if _is_protected(path, extra_ids, extra_paths):
                raise SourceOverwriteError(errno.EEXIST, f"path: {path!r} is a file read by load_nifti", path)
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, f"path: {path!r} already exists; pass overwrite=True to replace it")
        _fsync_path(directory, directory=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
