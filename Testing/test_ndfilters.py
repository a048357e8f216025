"""KneeReconLib.core.ndfilters gives scipy.ndimage's results (the reconstruction path uses it instead of
scipy, which it no longer imports): Gaussian smoothing bit for bit in float64, bilinear grid
sampling to rounding, bounding boxes and binary morphology exactly, on random data shaped like
the reconstruction's (odd sizes, edges, tiny and empty inputs)."""
import numpy as np
import pytest

from KneeReconLib.core import ndfilters as nf

ndi = pytest.importorskip("scipy.ndimage")  # scipy is a training/test dependency, not a runtime one
RNG = np.random.default_rng(15)


@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror", "constant", "wrap"])
@pytest.mark.parametrize("sigma", [0.3, 0.6, 1.0, 2.5, 7.0])
def test_gaussian_filter1d_is_scipys_bit_for_bit(mode, sigma):
    for shape, axis in (((57,), 0), ((5, 33), 1), ((4, 6, 9), 0), ((3,), 0)):  # (3,): radius beyond the line
        a = RNG.normal(size=shape)
        ours = nf.gaussian_filter1d(a, sigma, axis=axis, mode=mode)
        ref = ndi.gaussian_filter1d(a, sigma, axis=axis, mode=mode)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


def test_gaussian_filter_multi_axis_float32_and_float64():
    a64 = RNG.normal(size=(23, 17, 11))
    for sig, mode in ((0.6, "reflect"), ((1.7, 0.0, 3.1), "nearest"), ((0.0, 0.0, 0.0), "reflect")):
        np.testing.assert_array_equal(nf.gaussian_filter(a64, sig, mode=mode), ndi.gaussian_filter(a64, sig, mode=mode))
    # float32 (surfaces, back-projection): each pass rounded to float32, as scipy's
    a32 = RNG.random((40, 31, 29)).astype(np.float32)
    ours, ref = nf.gaussian_filter(a32, 0.6), ndi.gaussian_filter(a32, 0.6)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-7
    img = RNG.random((408, 324)).astype(np.float32)
    sig = [0.5 * np.sqrt(max(0.0, (g / s) ** 2 - 1.0)) for g, s in ((1.67, 0.524), (1.33, 0.524))]
    assert np.abs(nf.gaussian_filter(img, sig, mode="nearest") - ndi.gaussian_filter(img, sig, mode="nearest")).max() <= 1e-7
    # a mask the size of a bone's box, from uint8/bool: float64 out, as scipy
    m = RNG.random((30, 20, 25)) > 0.5
    np.testing.assert_array_equal(nf.gaussian_filter(m, 0.6), ndi.gaussian_filter(m.astype(np.float64), 0.6))
    with pytest.raises(ValueError, match="unknown boundary mode"):
        nf.gaussian_filter(a64, 1.0, mode="bogus")


@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_sample_bilinear_is_map_coordinates_on_a_grid(mode):
    img = RNG.random((41, 37)).astype(np.float32)
    # inside, outside, and exactly on the first and last samples
    rows = np.concatenate([RNG.uniform(-3, 43, 60), [0.0, 40.0, -1e-9, 40.0 + 1e-9, 20.0, 39.5]])
    cols = np.concatenate([RNG.uniform(-3, 39, 50), [0.0, 36.0, -0.5, 36.5, 17.0]])
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    ref = ndi.map_coordinates(img, [rr, cc], order=1, mode=mode, cval=0.25)
    ours = nf.sample_bilinear(img, rows, cols, mode=mode, cval=0.25)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-6
    np.testing.assert_array_equal(ours.astype(np.float32) == 0.25, ref == 0.25)
    # the edge values continue ('nearest'): a 1-row image is its row everywhere
    one = RNG.random((1, 5))
    np.testing.assert_allclose(nf.sample_bilinear(one, [-2.0, 0.0, 3.0], [0.0, 2.5]),
                               ndi.map_coordinates(one, np.meshgrid([-2.0, 0.0, 3.0], [0.0, 2.5], indexing="ij"),
                                                   order=1, mode="nearest"), atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_sample_planes_is_map_coordinates_per_plane(chunk):
    img = RNG.random((41, 37)).astype(np.float32)
    n = 7  # not a multiple of the chunk: the last chunk is short
    rows = RNG.uniform(-3, 43, (n, 23))
    cols = RNG.uniform(-3, 39, (n, 19))
    rows[0, :2], cols[0, :2] = [0.0, 40.0], [0.0, 36.0]  # exactly on the edges
    ours = nf.sample_planes(img, rows, cols, chunk=chunk)
    assert ours.shape == (n, 23, 19) and ours.dtype == np.float32
    for p in range(n):
        ref = ndi.map_coordinates(img, np.meshgrid(rows[p], cols[p], indexing="ij"), order=1, mode="nearest")
        assert np.abs(ours[p] - ref).max() <= 1e-5
    with pytest.raises(ValueError, match="same number of planes"):
        nf.sample_planes(img, rows, cols[:3])


def test_bounding_boxes_are_find_objects():
    lab = np.zeros((20, 30, 25), np.uint8)
    lab[3:9, 4:20, 10:11] = 1
    lab[15, 29, 24] = 3  # a single voxel in the far corner; label 2 absent
    lab[0:20, 0:1, 5:6] = 4
    assert nf.bounding_boxes(lab, 4) == ndi.find_objects(lab, max_label=4)
    for v in (1, 3, 4):
        assert nf.bounding_box(lab == v) == ndi.find_objects((lab == v).astype(np.uint8))[0]
    assert nf.bounding_box(lab == 2) is None


def _random_masks():
    for shape, p in (((64, 48), 0.5), ((64, 48), 0.8), ((17, 13, 11), 0.6), ((1, 9), 0.5), ((5, 5), 1.0)):
        yield RNG.random(shape) < p
    blob = np.zeros((80, 90), bool)  # a filled ring with a hole, touching the border on one side
    yy, xx = np.mgrid[:80, :90]
    r = np.hypot(yy - 40, xx - 60)
    blob[(r < 30) & (r > 10)] = True
    yield blob


def test_binary_morphology_is_scipys():
    for m in _random_masks():
        for bv in (0, 1):
            np.testing.assert_array_equal(nf.binary_erosion(m, border_value=bv), ndi.binary_erosion(m, border_value=bv))
        np.testing.assert_array_equal(nf.binary_erosion(m, 2), ndi.binary_erosion(m, iterations=2))
        for it in (1, 2):
            np.testing.assert_array_equal(nf.binary_dilation(m, it), ndi.binary_dilation(m, iterations=it))
        np.testing.assert_array_equal(nf.binary_closing(m), ndi.binary_closing(m, iterations=1))
        if m.ndim in (2, 3) and min(m.shape) > 1:
            np.testing.assert_array_equal(nf.binary_fill_holes(m), ndi.binary_fill_holes(m))
    ring = list(_random_masks())[-1]
    filled = nf.binary_fill_holes(ring)
    assert filled[40, 60] and not ring[40, 60]  # the hole is filled, the outside is not
    assert not filled[0, 0]


def test_uniform_filter_is_scipys_nearest_mode():
    for shape, size in (((40, 31), (5, 3)), ((7, 9), (9, 1)), ((3, 50), (1, 21)), ((12, 12), (1, 1))):
        a = RNG.random(shape).astype(np.float32)
        ours = nf.uniform_filter(a, size)
        ref = ndi.uniform_filter(a.astype(np.float64), size, mode="nearest")
        assert ours.dtype == np.float32 and ours.shape == a.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        nf.uniform_filter(np.zeros((4, 4)), (2, 3))
