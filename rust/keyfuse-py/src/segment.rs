//! Bindings for keypoint-transfer segmentation: `TransferAtlases` (training label maps in
//! run form, built once) and `vote_labels`.

use keyfuse_core::matching::{KeypointView, MatchParams};
use keyfuse_core::segment::{AtlasKeypoints as CoreAtlasKeypoints, AtlasSet, Transfer};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyArray4, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3,
};
use pyo3::prelude::*;

use crate::errors::detach;
use keyfuse_core::KfError;

/// The training label maps (int32, 0 = background) and normalised intensities (float32)
/// of a keypoint-transfer segmenter, in the run form the transfer accumulates from.
#[pyclass(frozen, module = "keyfuse._core")]
pub struct TransferAtlases {
    inner: AtlasSet,
}

type TransferOut<'py> = (
    Bound<'py, PyArray3<i32>>,
    Bound<'py, PyArray4<f32>>,
    Bound<'py, PyArray1<f64>>,
    usize,
);

#[pymethods]
impl TransferAtlases {
    #[new]
    fn new(
        py: Python<'_>,
        label_maps: Vec<PyReadonlyArray3<'_, i32>>,
        intensities: Vec<PyReadonlyArray3<'_, f32>>,
    ) -> PyResult<Self> {
        let l: Vec<_> = label_maps.iter().map(|a| a.as_array()).collect();
        let i: Vec<_> = intensities.iter().map(|a| a.as_array()).collect();
        let inner = detach(py, || AtlasSet::new(&l, &i))?;
        Ok(TransferAtlases { inner })
    }

    /// Distinct non-background labels, ascending.
    #[getter]
    fn labels(&self) -> Vec<i32> {
        self.inner.labels().to_vec()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Number of voxels of `label` in atlas `atlas`.
    fn organ_size(&self, atlas: usize, label: i32) -> usize {
        self.inner.organ_size(atlas, label)
    }

    /// Accumulate the transfers on the test grid; returns
    /// `(labels, probabilities, total_weight, n_groups)`.
    #[allow(clippy::too_many_arguments)]
    fn transfer<'py>(
        &self,
        py: Python<'py>,
        image: PyReadonlyArray3<'py, f32>,
        atlas: PyReadonlyArray1<'py, u32>,
        label: PyReadonlyArray1<'py, i32>,
        shift: PyReadonlyArray2<'py, i32>,
        weight: PyReadonlyArray1<'py, f64>,
        nu: PyReadonlyArray1<'py, f32>,
        background_fraction: f32,
    ) -> PyResult<TransferOut<'py>> {
        let (image, atlas, label, shift, weight, nu) = (
            image.as_array(),
            atlas.as_array(),
            label.as_array(),
            shift.as_array(),
            weight.as_array(),
            nu.as_array(),
        );
        let inner = &self.inner;
        let out = detach(py, || {
            let n = atlas.len();
            if label.len() != n || weight.len() != n || shift.nrows() != n || shift.ncols() != 3 {
                return Err(KfError::InvalidArgument(format!(
                    "transfer arrays disagree: atlas {}, label {}, shift {:?}, weight {}",
                    n,
                    label.len(),
                    shift.shape(),
                    weight.len()
                )));
            }
            let transfers: Vec<Transfer> = (0..n)
                .map(|k| Transfer {
                    atlas: atlas[k],
                    label: label[k],
                    shift: [shift[[k, 0]], shift[[k, 1]], shift[[k, 2]]],
                    weight: weight[k],
                })
                .collect();
            let nu: Vec<f32> = nu.to_vec();
            inner.transfer(image, &transfers, &nu, background_fraction)
        })?;
        Ok((
            out.labels.into_pyarray(py),
            out.probabilities.into_pyarray(py),
            out.total_weight.into_pyarray(py),
            out.n_groups,
        ))
    }
}

/// `(n, 3)` float64 rows as points.
fn rows3(name: &str, a: &PyReadonlyArray2<'_, f64>) -> Result<Vec<[f64; 3]>, KfError> {
    let a = a.as_array();
    if a.ncols() != 3 {
        return Err(KfError::InvalidArgument(format!(
            "{name} must have 3 columns, got shape {:?}",
            a.shape()
        )));
    }
    Ok(a.rows().into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

/// `(n, 64)` uint8 descriptors, row-major.
fn desc_rows(name: &str, a: &PyReadonlyArray2<'_, u8>) -> Result<Vec<u8>, KfError> {
    let a = a.as_array();
    if a.ncols() != keyfuse_core::DESC_LEN {
        return Err(KfError::InvalidArgument(format!(
            "{name} must have {} columns, got shape {:?}",
            keyfuse_core::DESC_LEN,
            a.shape()
        )));
    }
    Ok(a.iter().copied().collect())
}

/// The training keypoints of a keypoint-transfer segmenter (labels > 0), matched against
/// a test image's keypoints in one call (`match_all`), atlases in parallel.
#[pyclass(frozen, module = "keyfuse._core")]
pub struct AtlasKeypoints {
    inner: CoreAtlasKeypoints,
}

type AtlasMatchOut<'py> = (
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray2<f64>>,
);

#[pymethods]
impl AtlasKeypoints {
    #[new]
    fn new(
        py: Python<'_>,
        descriptors: Vec<PyReadonlyArray2<'_, u8>>,
        xyz: Vec<PyReadonlyArray2<'_, f64>>,
        scale: Vec<PyReadonlyArray1<'_, f64>>,
        labels: Vec<PyReadonlyArray1<'_, i32>>,
    ) -> PyResult<Self> {
        let n = descriptors.len();
        let sets = (|| {
            if xyz.len() != n || scale.len() != n || labels.len() != n {
                return Err(KfError::InvalidArgument(format!(
                    "{n} descriptor sets, {} positions, {} scales, {} label sets",
                    xyz.len(),
                    scale.len(),
                    labels.len()
                )));
            }
            (0..n)
                .map(|i| {
                    Ok((
                        desc_rows("descriptors", &descriptors[i])?,
                        rows3("xyz", &xyz[i])?,
                        scale[i].as_array().to_vec(),
                        labels[i].as_array().to_vec(),
                    ))
                })
                .collect::<Result<Vec<_>, KfError>>()
        })();
        let sets = sets.map_err(|e| crate::to_pyerr(py, e))?;
        let inner = detach(py, || CoreAtlasKeypoints::new(sets))?;
        Ok(AtlasKeypoints { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Number of keypoints of atlas `atlas`.
    fn n_keypoints(&self, atlas: usize) -> usize {
        self.inner.n_keypoints(atlas)
    }

    /// Match test keypoints to every atlas (as `match_sets` per atlas; with
    /// `hough_queries` > 0 the Hough mode is voted by at most about that many test
    /// keypoints); returns `(query, atlas, index, label, dist2, p, shift (n, 3) =
    /// x_test − x_atlas)`.
    #[pyo3(signature = (descriptors, xyz, scale, ratio=0.9, scale_factor=2.0, hough=true,
        hough_sigma=3.0, keep_fraction=0.1, kde_bandwidth=3.0, hough_queries=0))]
    #[allow(clippy::too_many_arguments)]
    fn match_all<'py>(
        &self,
        py: Python<'py>,
        descriptors: PyReadonlyArray2<'py, u8>,
        xyz: PyReadonlyArray2<'py, f64>,
        scale: PyReadonlyArray1<'py, f64>,
        ratio: f64,
        scale_factor: f64,
        hough: bool,
        hough_sigma: f64,
        keep_fraction: f64,
        kde_bandwidth: f64,
        hough_queries: usize,
    ) -> PyResult<AtlasMatchOut<'py>> {
        let d = desc_rows("descriptors", &descriptors).map_err(|e| crate::to_pyerr(py, e))?;
        let x = rows3("xyz", &xyz).map_err(|e| crate::to_pyerr(py, e))?;
        let s = scale.as_array().to_vec();
        let params = MatchParams {
            ratio,
            scale_factor,
            hough,
            hough_sigma,
            keep_fraction,
            kde_bandwidth,
        };
        let inner = &self.inner;
        let m = detach(py, || {
            let a = KeypointView {
                desc: &d,
                xyz: &x,
                scale: &s,
            };
            inner.match_all(&a, &params, hough_queries)
        })?;
        let n = m.query.len();
        let shift = numpy::ndarray::Array2::from_shape_vec(
            (n, 3),
            m.shift.iter().flatten().copied().collect(),
        )
        .expect("n × 3");
        let dist2: Vec<f32> = m.dist2.iter().map(|&v| v as f32).collect();
        Ok((
            m.query.into_pyarray(py),
            m.atlas.into_pyarray(py),
            m.index.into_pyarray(py),
            m.label.into_pyarray(py),
            dist2.into_pyarray(py),
            m.p.into_pyarray(py),
            shift.into_pyarray(py),
        ))
    }
}

type VoteOut<'py> = (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<f32>>);

/// Keypoint label voting; returns `(label per test keypoint (0 = none), certainty)`.
#[pyfunction]
fn vote_labels<'py>(
    py: Python<'py>,
    n_query: usize,
    query: PyReadonlyArray1<'py, u32>,
    label: PyReadonlyArray1<'py, i32>,
    dist2: PyReadonlyArray1<'py, f32>,
    pm: PyReadonlyArray1<'py, f32>,
) -> PyResult<VoteOut<'py>> {
    let (query, label, dist2, pm) = (
        query.as_array(),
        label.as_array(),
        dist2.as_array(),
        pm.as_array(),
    );
    let (l, c) = detach(py, || {
        let (q, l, d, p) = (query.to_vec(), label.to_vec(), dist2.to_vec(), pm.to_vec());
        keyfuse_core::segment::vote_labels(n_query, &q, &l, &d, &p)
    })?;
    Ok((l.into_pyarray(py), c.into_pyarray(py)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TransferAtlases>()?;
    m.add_class::<AtlasKeypoints>()?;
    m.add_function(wrap_pyfunction!(vote_labels, m)?)?;
    Ok(())
}
