"""Tests for fastmed.io: NIfTI load/save round trips, RAS reorientation, source protection, atomic
writes and bad input. CPU only, small arrays, tmp_path only."""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import fastmed.io as fio
from fastmed.io import NiftiImage, Reorientation, SourceOverwriteError, from_ras, load_nifti, save_nifti, to_ras


# ------------------------------------------------------------------------------------------------
# affines used throughout
# ------------------------------------------------------------------------------------------------

def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(rot: np.ndarray, zooms, trans) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(zooms)
    a[:3, 3] = trans
    return a


RAS = _affine(np.eye(3), (1.5, 0.8, 2.0), (-10.0, 20.0, 5.0))
LPS = _affine(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.7, 3.0), (120.5, 110.25, -40.0))  # DICOM-like voxel order
OBLIQUE = _affine(_rot(2, 25.0) @ _rot(0, -12.0), (0.9, 1.1, 2.5), (-91.2, 33.3, 7.7))
# voxel axes i->P, j->S, k->L (every axis permuted and two flipped), slightly oblique
PSL = _affine(_rot(1, 7.0) @ np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float), (1.2, 0.6, 3.3), (50.0, 60.0, -70.0))
AFFINES = {"ras": RAS, "lps": LPS, "oblique": OBLIQUE, "psl": PSL}

SHAPE = (7, 6, 5)  # odd, all different: a wrong permutation cannot go unnoticed


def _f32(a: np.ndarray) -> np.ndarray:
    """What NIfTI-1 stores: the sform in float32."""
    return a.astype(np.float32).astype(np.float64)


def _data(dtype, shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype) * 100
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -3000), min(info.max, 3000), size=shape, endpoint=True).astype(dtype)


def _header(affine, dtype, qcode=1, scode=1) -> nib.Nifti1Header:
    h = nib.Nifti1Header()
    h.set_data_dtype(dtype)
    h.set_qform(affine, code=qcode)
    h.set_sform(affine, code=scode)
    h.set_xyzt_units("mm", "sec")
    h["descrip"] = b"fastmed test"
    return h


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
@pytest.mark.parametrize("name", ["lps", "oblique"])
def test_roundtrip_keeps_header(tmp_path, ext, dtype, name):
    affine = AFFINES[name]
    data = _data(dtype)
    hdr = _header(affine, dtype, qcode=1, scode=4)
    p1 = str(tmp_path / f"a{ext}")
    assert save_nifti(torch.from_numpy(data), affine, p1, header=hdr) == p1
    if ext == ".nii.gz":
        with open(p1, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"  # gzip magic

    img = load_nifti(p1)
    assert isinstance(img, NiftiImage)
    assert isinstance(img.data, torch.Tensor) and img.data.is_contiguous()
    assert img.data.dtype == torch.from_numpy(data).dtype  # no scaling: on-disk type kept
    assert np.array_equal(img.data.numpy(), data)
    assert img.dtype == np.dtype(dtype)
    assert img.qform_code == 1 and img.sform_code == 4
    assert img.affine.dtype == np.float64 and img.affine.shape == (4, 4)
    np.testing.assert_array_equal(img.affine, _f32(affine))  # sform, stored as float32
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(img.spacing, zooms, rtol=1e-6)
    np.testing.assert_allclose(img.header["pixdim"][1:4], zooms, rtol=1e-6)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert img.path == os.path.realpath(p1)

    # second generation through like=: the header block is byte-identical
    p2 = str(tmp_path / f"b{ext}")
    save_nifti(img.data, img.affine, p2, like=img)
    h1, h2 = nib.load(p1).header, nib.load(p2).header
    assert h1.binaryblock == h2.binaryblock
    img2 = load_nifti(p2)
    assert torch.equal(img2.data, img.data)
    np.testing.assert_array_equal(img2.affine, img.affine)


def test_scaled_int16_roundtrip_is_exact(tmp_path):
    raw = _data(np.int16)
    src = nib.Nifti1Image(raw, LPS)
    src.header.set_data_dtype(np.int16)
    src.header.set_slope_inter(2.0, -1024.0)
    p = str(tmp_path / "ct.nii.gz")
    nib.save(src, p)

    img = load_nifti(p)
    assert img.dtype == np.int16 and img.data.dtype == torch.float32  # scaling applied, float32 values
    np.testing.assert_array_equal(img.data.numpy(), raw.astype(np.float64) * 2.0 - 1024.0)
    assert img.header.get_slope_inter() == (2.0, -1024.0)

    out = str(tmp_path / "ct_out.nii.gz")
    save_nifti(img.data, img.affine, out, like=img)
    back = nib.load(out)
    assert back.get_data_dtype() == np.int16
    assert (back.dataobj.slope, back.dataobj.inter) == (2.0, -1024.0)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj.get_unscaled()), raw)  # same stored integers

    # values the old scaling cannot hold: nibabel picks a new slope/intercept (close, not exact)
    out2 = str(tmp_path / "ct_half.nii.gz")
    save_nifti(img.data + 0.5, img.affine, out2, like=img)
    back2 = nib.load(out2)
    assert back2.get_data_dtype() == np.int16 and back2.dataobj.slope != 2.0
    np.testing.assert_allclose(back2.get_fdata(), img.data.numpy() + 0.5, atol=back2.dataobj.slope)


def test_int32_scaled_loads_as_float64(tmp_path):
    src = nib.Nifti1Image(np.arange(210, dtype=np.int32).reshape(SHAPE) * 100003, RAS)
    src.header.set_data_dtype(np.int32)
    src.header.set_slope_inter(0.5, 3.0)
    p = str(tmp_path / "i32.nii")
    nib.save(src, p)
    img = load_nifti(p, as_tensor=False)
    assert img.data.dtype == np.float64
    np.testing.assert_array_equal(img.data, np.arange(210).reshape(SHAPE) * 100003 * 0.5 + 3.0)


def test_label_map_stays_integer_and_float_labels_are_exact(tmp_path):
    labels = _data(np.uint8) % 4
    p = str(tmp_path / "seg.nii.gz")
    save_nifti(labels, RAS, p, dtype=np.uint8)
    seg = load_nifti(p)
    assert seg.data.dtype == torch.uint8 and seg.dtype == np.uint8
    assert np.array_equal(seg.data.numpy(), labels)

    # a prediction computed in float (argmax as float32) written like the label map: exact uint8 on disk
    pred = seg.data.float().flip(0)
    out = str(tmp_path / "pred.nii.gz")
    save_nifti(pred, None, out, like=seg)
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    assert (back.dataobj.slope, back.dataobj.inter) == (1.0, 0.0)
    assert np.array_equal(np.asanyarray(back.dataobj), labels[::-1])


def test_default_dtype_and_codes(tmp_path):
    cases = {
        "b.nii": (np.ones(SHAPE, bool), np.uint8),
        "i64.nii": (np.arange(210, dtype=np.int64).reshape(SHAPE), np.int32),
        "f64.nii": (np.linspace(0, 1, 210).reshape(SHAPE), np.float64),
        "h.nii": (torch.linspace(0, 1, 210).reshape(SHAPE).half(), np.float32),
        "bf.nii": (torch.linspace(0, 1, 210).reshape(SHAPE).bfloat16(), np.float32),
    }
    for name, (data, ondisk) in cases.items():
        p = str(tmp_path / name)
        save_nifti(data, OBLIQUE, p)
        img = load_nifti(p, as_tensor=False)
        assert img.dtype == np.dtype(ondisk), name
        ref = data.float().numpy() if isinstance(data, torch.Tensor) else data
        np.testing.assert_array_equal(img.data, ref.astype(ondisk))
        assert (img.qform_code, img.sform_code) == (1, 1)  # as ITK / SimpleITK write
        np.testing.assert_array_equal(img.affine, _f32(OBLIQUE))
        np.testing.assert_allclose(nib.load(p).header.get_qform(), OBLIQUE, atol=1e-4)


def test_sheared_affine_kept_by_sform(tmp_path):
    shear = RAS.copy()
    shear[0, 1] = 0.3
    p = str(tmp_path / "shear.nii")
    save_nifti(np.zeros(SHAPE, np.float32), shear, p)
    img = load_nifti(p)
    assert (img.qform_code, img.sform_code) == (0, 1)
    np.testing.assert_array_equal(img.affine, _f32(shear))

    # qform-only reference header: the sform takes the qform's code so that the shear is not lost
    hdr = _header(RAS, np.float32, qcode=2, scode=0)
    p2 = str(tmp_path / "shear2.nii")
    save_nifti(np.zeros(SHAPE, np.float32), shear, p2, header=hdr)
    img2 = load_nifti(p2)
    assert (img2.qform_code, img2.sform_code) == (2, 2)
    np.testing.assert_array_equal(img2.affine, _f32(shear))


def test_new_affine_with_reference_header_sets_both_forms(tmp_path):
    hdr = _header(RAS, np.int16, qcode=1, scode=2)
    p = str(tmp_path / "moved.nii.gz")
    save_nifti(_data(np.int16), OBLIQUE, p, header=hdr)
    img = load_nifti(p)
    assert (img.qform_code, img.sform_code) == (1, 2) and img.dtype == np.int16
    np.testing.assert_array_equal(img.affine, _f32(OBLIQUE))
    np.testing.assert_allclose(img.header.get_qform(), OBLIQUE, atol=1e-4)
    np.testing.assert_allclose(img.spacing, (0.9, 1.1, 2.5), rtol=1e-6)


def test_4d_trailing_dims_uint16_and_nifti2(tmp_path):
    data = _data(np.uint16, shape=SHAPE + (3,))
    hdr = _header(LPS, np.uint16)
    hdr.set_data_shape(data.shape)
    hdr.set_zooms(tuple(np.sqrt((LPS[:3, :3] ** 2).sum(0))) + (2.5,))  # TR 2.5 s
    p = str(tmp_path / "dwi.nii.gz")
    save_nifti(data, LPS, p, header=hdr)
    img = load_nifti(p)
    assert img.shape == SHAPE + (3,)  # (X, Y, Z, t) as nibabel gives it
    assert img.data.dtype == torch.int32 and img.dtype == np.uint16  # torch: uint16 widened
    assert np.array_equal(img.data.numpy(), data)
    assert len(img.spacing) == 3 and img.header.get_zooms()[3] == 2.5
    assert load_nifti(p, as_tensor=False).data.dtype == np.uint16
    assert load_nifti(p, dtype=torch.float64).data.dtype == torch.float64
    assert load_nifti(p, as_tensor=False, dtype="float32").data.dtype == np.float32

    out = str(tmp_path / "dwi2.nii")
    save_nifti(img.data, img.affine, out, like=img)
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint16 and back.header.get_zooms()[3] == 2.5
    assert np.array_equal(np.asanyarray(back.dataobj), data)

    p2 = str(tmp_path / "n2.nii")
    save_nifti(data[..., 0], LPS, p2, header=nib.Nifti2Header())
    assert isinstance(nib.load(p2), nib.Nifti2Image)
    img2 = load_nifti(p2)
    assert isinstance(img2.header, nib.Nifti2Header) and np.array_equal(img2.data.numpy(), data[..., 0])


def test_big_endian_file_loads_native(tmp_path):
    data = _data(np.int16)
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(np.int16)
    src = nib.Nifti1Image(data.astype(">i2"), RAS, header=hdr)
    p = str(tmp_path / "be.nii")
    nib.save(src, p)
    assert open(p, "rb").read(4) == (348).to_bytes(4, "big")  # really a big-endian file
    img = load_nifti(p)
    assert img.data.dtype == torch.int16 and img.dtype == np.dtype("int16")
    assert np.array_equal(img.data.numpy(), data)


# ------------------------------------------------------------------------------------------------
# RAS reorientation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("as_tensor", [True, False])
def test_to_ras_from_ras_roundtrip(tmp_path, name, as_tensor):
    affine = AFFINES[name]
    data = _data(np.float32, shape=SHAPE + (2,))  # trailing channel axis
    p = str(tmp_path / "x.nii.gz")
    save_nifti(data, affine, p)
    nimg = nib.load(p)
    img = load_nifti(p, as_tensor=as_tensor)

    ras = to_ras(img)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert isinstance(ras.reorientation, Reorientation)
    assert type(ras.data) is type(img.data)
    # the same as nibabel's as_closest_canonical
    canon = nib.as_closest_canonical(nimg)
    np.testing.assert_array_equal(np.asarray(ras.data), np.asanyarray(canon.dataobj))
    np.testing.assert_allclose(ras.affine, canon.affine, atol=1e-9)
    # a voxel keeps its world position and value
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        world = img.affine @ np.array(ijk + (1,), float)
        r = np.linalg.solve(ras.affine, world)[:3]
        assert np.allclose(r, np.round(r), atol=1e-6)
        r = tuple(int(v) for v in np.round(r))
        np.testing.assert_array_equal(np.asarray(ras.data[r]), np.asarray(img.data[ijk]))
    # spacing follows the axes
    zooms = np.sqrt((ras.affine[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(ras.spacing, zooms, rtol=1e-6)

    back, back_affine = from_ras(ras.data, ras)
    assert type(back) is type(img.data)
    if as_tensor:
        assert torch.equal(back, img.data) and back.is_contiguous()
    else:
        assert np.array_equal(back, img.data) and back.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(back_affine, img.affine)  # bit-identical: the stored original
    # with the Reorientation only, or with the original image
    b2, a2 = from_ras(ras.data, ras.reorientation)
    b3, a3 = from_ras(ras.data, img)
    for b, a in ((b2, a2), (b3, a3)):
        assert np.array_equal(np.asarray(b), np.asarray(img.data))
        np.testing.assert_array_equal(a, img.affine)

    # canonical=True is to_ras(load_nifti(...)); to_ras of an RAS image is a no-op
    can = load_nifti(p, as_tensor=as_tensor, canonical=True)
    assert np.array_equal(np.asarray(can.data), np.asarray(ras.data))
    np.testing.assert_array_equal(can.affine, ras.affine)
    assert to_ras(can) is can


def test_ras_prediction_saved_in_original_orientation(tmp_path):
    """The usual inference loop: load canonical, predict, map back, save like the input."""
    data = _data(np.int16)
    p = str(tmp_path / "in.nii.gz")
    save_nifti(data, PSL, p, dtype=np.int16)
    orig = load_nifti(p)
    ras = load_nifti(p, canonical=True)
    pred_ras = (ras.data > 0).to(torch.uint8)
    pred, affine = from_ras(pred_ras, ras)
    out = str(tmp_path / "pred.nii.gz")
    save_nifti(pred, affine, out, like=orig, dtype=torch.uint8)
    back = load_nifti(out)
    assert back.dtype == np.uint8
    assert torch.equal(back.data, (orig.data > 0).to(torch.uint8))
    np.testing.assert_array_equal(back.affine, orig.affine)
    assert (back.qform_code, back.sform_code) == (orig.qform_code, orig.sform_code)


def test_from_ras_rejects_wrong_shape_and_types():
    img = NiftiImage(data=torch.zeros(SHAPE), affine=PSL, dtype=np.dtype(np.float32), header=nib.Nifti1Header(),
                     qform_code=1, sform_code=1, spacing=(1.0, 1.0, 1.0), path=None)
    ras = to_ras(img)
    assert ras.reorientation.ras_shape == tuple(ras.shape)
    with pytest.raises(ValueError, match="data: spatial shape"):
        from_ras(torch.zeros(SHAPE), ras)  # the original shape, not the RAS one
    with pytest.raises(ValueError, match="data: expected 3 to 7"):
        from_ras(torch.zeros(5, 5), ras)
    with pytest.raises(TypeError, match="data"):
        from_ras([[[0.0]]], ras)
    with pytest.raises(TypeError, match="img_or_orientation"):
        from_ras(ras.data, "RAS")
    with pytest.raises(TypeError, match="img"):
        to_ras(np.zeros(SHAPE))


# ------------------------------------------------------------------------------------------------
# never overwrite a source; refuse existing files
# ------------------------------------------------------------------------------------------------

def test_refuses_to_overwrite_loaded_file(tmp_path):
    p = str(tmp_path / "src.nii.gz")
    save_nifti(_data(np.int16), RAS, p)
    before = open(p, "rb").read()
    img = load_nifti(p)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(p)
    hard = str(tmp_path / "hard.nii.gz")
    os.link(p, hard)
    for target in (p, str(link), hard, str(tmp_path / "." / "src.nii.gz")):
        for overwrite in (False, True):
            with pytest.raises(SourceOverwriteError, match="path:.*never overwrites"):
                save_nifti(img.data + 1, img.affine, target, overwrite=overwrite)
    assert isinstance(SourceOverwriteError("x"), FileExistsError)
    assert open(p, "rb").read() == before
    assert os.path.islink(link) and sorted(os.listdir(tmp_path)) == ["hard.nii.gz", "link.nii.gz", "src.nii.gz"]


def test_refuses_like_source_loaded_by_nibabel(tmp_path):
    p = str(tmp_path / "nib_src.nii")
    nib.save(nib.Nifti1Image(_data(np.float32), RAS), p)
    before = open(p, "rb").read()
    like = nib.load(p)  # not through load_nifti: only like= tells us where it came from
    with pytest.raises(SourceOverwriteError):
        save_nifti(np.zeros(SHAPE, np.float32), RAS, p, like=like, overwrite=True)
    assert open(p, "rb").read() == before


def test_existing_file_needs_overwrite(tmp_path):
    p = str(tmp_path / "out.nii")
    save_nifti(np.zeros(SHAPE, np.float32), RAS, p)
    before = open(p, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite=True") as exc:
        save_nifti(np.ones(SHAPE, np.float32), RAS, p)
    assert not isinstance(exc.value, SourceOverwriteError)
    assert open(p, "rb").read() == before
    # a dangling symlink counts as existing too
    dangling = tmp_path / "dangling.nii"
    dangling.symlink_to(tmp_path / "nowhere.nii")
    with pytest.raises(FileExistsError):
        save_nifti(np.ones(SHAPE, np.float32), RAS, str(dangling))
    # overwrite=True replaces a file that was never loaded
    save_nifti(np.ones(SHAPE, np.float32), RAS, p, overwrite=True)
    assert np.array_equal(np.asanyarray(nib.load(p).dataobj), np.ones(SHAPE, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["dangling.nii", "out.nii"]  # no temporary file left
    assert oct(os.stat(p).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


# ------------------------------------------------------------------------------------------------
# atomic save
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_during_write_leaves_nothing(tmp_path, monkeypatch, overwrite):
    p = str(tmp_path / "atomic.nii.gz")
    if overwrite:
        save_nifti(np.zeros(SHAPE, np.float32), RAS, p)
        before = open(p, "rb").read()
    calls = []

    def broken_to_filename(self, filename, **kwargs):
        calls.append(filename)
        with open(filename, "wb") as f:  # half a file, then the disk "fills up"
            f.write(b"\x1f\x8b" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", broken_to_filename)
    with pytest.raises(OSError, match="No space left"):
        save_nifti(np.ones(SHAPE, np.float32), RAS, p, overwrite=overwrite)
    assert len(calls) == 1
    tmp = calls[0]
    assert os.path.dirname(tmp) == str(tmp_path) and tmp != p  # the temporary file was in the same directory
    assert not os.path.exists(tmp)
    if overwrite:
        assert os.listdir(tmp_path) == ["atomic.nii.gz"] and open(p, "rb").read() == before
    else:
        assert os.listdir(tmp_path) == []


def test_failure_at_rename_and_interrupt_leave_nothing(tmp_path, monkeypatch):
    p = str(tmp_path / "keep.nii")
    save_nifti(np.zeros(SHAPE, np.float32), RAS, p)
    before = open(p, "rb").read()

    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fio.os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        save_nifti(np.ones(SHAPE, np.float32), RAS, p, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["keep.nii"] and open(p, "rb").read() == before

    def interrupted(self, filename, **kwargs):
        open(filename, "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_nifti(np.ones(SHAPE, np.float32), RAS, str(tmp_path / "new.nii"))
    assert os.listdir(tmp_path) == ["keep.nii"]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        load_nifti(tmp_path / "missing.nii.gz")
    with pytest.raises(IsADirectoryError, match="path:.*directory"):
        load_nifti(tmp_path)
    (tmp_path / "d.nii").mkdir()
    with pytest.raises(IsADirectoryError, match="path"):
        load_nifti(tmp_path / "d.nii")
    with pytest.raises(TypeError, match="path: expected a str"):
        load_nifti(3)
    with pytest.raises(TypeError, match="path"):
        load_nifti(None)
    with pytest.raises(ValueError, match="path: empty"):
        load_nifti("")
    with pytest.raises(TypeError, match="dtype"):
        load_nifti(tmp_path / "missing.nii", dtype="not-a-dtype")


def test_load_corrupt_and_foreign_files(tmp_path):
    rng = np.random.default_rng(1)
    good = str(tmp_path / "good.nii.gz")
    save_nifti(rng.standard_normal((20, 20, 20)).astype(np.float32), RAS, good)
    blob = open(good, "rb").read()
    files = {
        "truncated.nii.gz": blob[: len(blob) // 2],
        "random.nii": rng.bytes(2000),
        "random.nii.gz": rng.bytes(2000),
        "image.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(200),
        "png_named.nii": b"\x89PNG\r\n\x1a\n" + rng.bytes(500),
        "notes.txt": b"hello, not an image\n",
        "text.nii.gz": gzip.compress(b"hello, not an image\n"),
        "empty.nii": b"",
    }
    save_nifti(np.ones((20, 20, 20), np.float32), RAS, str(tmp_path / "full.nii"))
    files["short_data.nii"] = open(str(tmp_path / "full.nii"), "rb").read()[:1000]
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="path") as exc:
            load_nifti(path)
        assert name in str(exc.value) or "NIfTI" in str(exc.value), name


def test_save_bad_affine(tmp_path):
    data = np.zeros(SHAPE, np.float32)
    nan = RAS.copy()
    nan[0, 0] = np.nan
    singular = RAS.copy()
    singular[:3, 2] = singular[:3, 0]  # two equal columns
    zero_col = RAS.copy()
    zero_col[:3, 1] = 0
    last_row = RAS.copy()
    last_row[3, 0] = 1
    for bad, msg in [(nan, "NaN"), (singular, "singular"), (zero_col, "singular"), (last_row, "last row"),
                     (np.eye(3), "shape"), (np.eye(4)[None], "shape")]:
        with pytest.raises(ValueError, match=f"affine: .*{msg}"):
            save_nifti(data, bad, str(tmp_path / "x.nii"))
    with pytest.raises(TypeError, match="affine"):
        save_nifti(data, "eye", str(tmp_path / "x.nii"))
    with pytest.raises(ValueError, match="affine: None"):
        save_nifti(data, None, str(tmp_path / "x.nii"))
    torch_affine = torch.from_numpy(OBLIQUE)
    save_nifti(data, torch_affine, str(tmp_path / "t.nii"))  # a tensor affine is fine
    assert os.listdir(tmp_path) == ["t.nii"]


def test_save_bad_data_and_paths(tmp_path):
    ok = np.zeros(SHAPE, np.float32)
    for bad in (np.zeros((), np.float32), np.zeros((2,) * 8, np.float32)):
        with pytest.raises(ValueError, match="data: expected 1 to 7 dimensions"):
            save_nifti(bad, RAS, str(tmp_path / "x.nii"))
    with pytest.raises(ValueError, match="data: has an empty dimension"):
        save_nifti(np.zeros((3, 0, 2)), RAS, str(tmp_path / "x.nii"))
    with pytest.raises(TypeError, match="data: expected a torch.Tensor"):
        save_nifti([[[1.0]]], RAS, str(tmp_path / "x.nii"))
    with pytest.raises(TypeError, match="data: unsupported"):
        save_nifti(np.array([["a"]]), RAS, str(tmp_path / "x.nii"))
    with pytest.raises(ValueError, match="data: integer values .* do not fit"):
        save_nifti(np.full(SHAPE, 300, np.int32), RAS, str(tmp_path / "x.nii"), dtype=np.uint8)
    for v in (np.nan, np.inf, -np.inf):  # nibabel would store 0 / 1 without a word
        bad = np.ones(SHAPE, np.float32)
        bad[0, 0, 0] = v
        with pytest.raises(ValueError, match="data: NaN or infinite"):
            save_nifti(bad, RAS, str(tmp_path / "x.nii"), dtype=np.int16)
    with pytest.raises(ValueError, match="path: .*must end with .nii or .nii.gz"):
        save_nifti(ok, RAS, str(tmp_path / "x.png"))
    with pytest.raises(FileNotFoundError, match="path: the directory"):
        save_nifti(ok, RAS, str(tmp_path / "no" / "such" / "x.nii"))
    (tmp_path / "dir.nii").mkdir()
    with pytest.raises(IsADirectoryError, match="path"):
        save_nifti(ok, RAS, str(tmp_path / "dir.nii"), overwrite=True)
    with pytest.raises(TypeError, match="path"):
        save_nifti(ok, RAS, 5)
    with pytest.raises(TypeError, match="dtype: NIfTI has no float16"):
        save_nifti(ok, RAS, str(tmp_path / "x.nii"), dtype=np.float16)
    with pytest.raises(TypeError, match="dtype: not a dtype"):
        save_nifti(ok, RAS, str(tmp_path / "x.nii"), dtype="nope")
    with pytest.raises(TypeError, match="like"):
        save_nifti(ok, RAS, str(tmp_path / "x.nii"), like="img.nii")
    with pytest.raises(TypeError, match="header"):
        save_nifti(ok, RAS, str(tmp_path / "x.nii"), header={"qform_code": 1})
    with pytest.raises(TypeError, match="overwrite"):
        save_nifti(ok, RAS, str(tmp_path / "x.nii"), overwrite="yes")
    assert os.listdir(tmp_path) == ["dir.nii"]  # nothing was written by any failed call


def test_save_accepts_grad_tensor_and_returns_path(tmp_path):
    t = torch.randn(SHAPE, requires_grad=True)
    p = tmp_path / "g.nii.gz"
    assert save_nifti(t * 2, RAS, p) == str(p)  # os.PathLike accepted
    np.testing.assert_array_equal(load_nifti(p).data.numpy(), (t * 2).detach().numpy())
    r = repr(load_nifti(p, canonical=True))
    assert "NiftiImage(shape=(7, 6, 5)" in r and "reoriented=True" in r


# ------------------------------------------------------------------------------------------------
# cases an adversarial fuzz against nibabel found (18th session)


def test_like_opened_by_a_relative_path_is_protected_after_a_chdir(tmp_path, monkeypatch):
    """A nibabel image opened as "ct.nii" names no directory: after a chdir its source is any
    destination ending in ct.nii, and save_nifti refuses them all, even with overwrite=True."""
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src_dir / "ct.nii"))
    before = (src_dir / "ct.nii").read_bytes()
    monkeypatch.chdir(src_dir)
    ref = nib.load("ct.nii")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceOverwriteError):
        save_nifti(data, np.eye(4), str(src_dir / "ct.nii"), like=ref, overwrite=True)
    assert (src_dir / "ct.nii").read_bytes() == before
    save_nifti(data, np.eye(4), str(tmp_path / "seg.nii"), like=ref)  # another name: written
    monkeypatch.chdir(tmp_path / "in")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    ref2 = nib.load("../in/ct.nii")  # through a parent directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceOverwriteError):
        save_nifti(data, np.eye(4), str(src_dir / "ct.nii"), like=ref2, overwrite=True)
    assert (src_dir / "ct.nii").read_bytes() == before


def test_affine_within_tolerance_keeps_the_reference_codes(tmp_path):
    """An affine off the reference's by float32 noise (inside the 'same affine' tolerance) keeps
    the reference's forms and codes; nibabel's constructor used to rewrite them to (0, 2)."""
    A = np.array([[0.8, 0, 0, -100.0], [0, 0.8, 0, -120.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
    h = nib.Nifti1Header()
    h.set_data_dtype(np.int16)
    h.set_qform(A, code=1)
    h.set_sform(A, code=1)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), A, header=h), str(tmp_path / "ct.nii.gz"))
    img = load_nifti(str(tmp_path / "ct.nii.gz"))
    for eps in (0.0, 1e-7, 5e-6):
        aff = img.affine.copy()
        aff[0, 1] += eps
        out = str(tmp_path / f"seg_{eps:g}.nii.gz")
        save_nifti(np.zeros((4, 5, 6), np.uint8), aff, out, like=img, dtype=np.uint8)
        r = nib.load(out)
        assert (int(r.header["qform_code"]), int(r.header["sform_code"])) == (1, 1), eps


def test_long_names_big_endian_data_and_unwritable_types(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    long = str(tmp_path / ("x" * 240 + ".nii"))  # a legal name; the temporary one must fit too
    save_nifti(data, np.eye(4), long)
    assert np.array_equal(np.asarray(nib.load(long).dataobj), data)
    be = np.arange(24, dtype=">i8").reshape(2, 3, 4)  # big-endian int64 that fits int32: written as int32
    save_nifti(be, np.eye(4), str(tmp_path / "be.nii"))
    assert nib.load(str(tmp_path / "be.nii")).get_data_dtype() == np.int32
    save_nifti(np.ones((2, 3, 4), dtype=">f2"), np.eye(4), str(tmp_path / "be16.nii"))  # widened as native f2
    assert nib.load(str(tmp_path / "be16.nii")).get_data_dtype() == np.float32
    with pytest.raises(ValueError, match="data: a tensor on the meta device"):
        save_nifti(torch.empty(2, 3, 4, device="meta"), np.eye(4), str(tmp_path / "m.nii"))
    with pytest.raises(TypeError, match="data: tensors of dtype torch.float8"):
        save_nifti(torch.zeros(2, 3, 4).to(torch.float8_e4m3fn), np.eye(4), str(tmp_path / "f8.nii"))
    with pytest.raises(TypeError, match="dtype: the on-disk type object"):
        save_nifti(data, np.eye(4), str(tmp_path / "o.nii"), dtype=object)
    with pytest.raises(TypeError, match="canonical"):
        load_nifti(long, canonical="no")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x" * 240 + ".nii", "be.nii", "be16.nii"])
