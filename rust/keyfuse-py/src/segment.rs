//! Bindings for keypoint-transfer segmentation: `TransferAtlases` (training label maps in
//! run form, built once) and `vote_labels`.

use keyfuse_core::matching::MatchParams;
use keyfuse_core::segment::{
    posterior_in_place, AtlasKeypoints as CoreAtlasKeypoints, AtlasSet, BackgroundRule, Transfer,
};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyArray4, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3,
};
use pyo3::prelude::*;

use crate::convert::{keypoints, rows_array};
use crate::errors::{detach, invalid};

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
    /// `(labels, probabilities, total_weight, n_groups)`. `max_vote`: the background rule
    /// against the largest vote instead of per-label shares. `posterior`: the
    /// probabilities divided per voxel by max(1, their sum) (`posterior_in_place`).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (image, atlas, label, shift, weight, nu, background_fraction, max_vote = false, posterior = false))]
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
        max_vote: bool,
        posterior: bool,
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
        let n = atlas.len();
        if label.len() != n || weight.len() != n || shift.nrows() != n || shift.ncols() != 3 {
            return Err(invalid(
                py,
                format!(
                    "transfer arrays disagree: atlas {}, label {}, shift {:?}, weight {}",
                    n,
                    label.len(),
                    shift.shape(),
                    weight.len()
                ),
            ));
        }
        let out = detach(py, || {
            let transfers: Vec<Transfer> = (0..n)
                .map(|k| Transfer {
                    atlas: atlas[k],
                    label: label[k],
                    shift: [shift[[k, 0]], shift[[k, 1]], shift[[k, 2]]],
                    weight: weight[k],
                })
                .collect();
            let nu: Vec<f32> = nu.to_vec();
            let rule = if max_vote {
                BackgroundRule::MaxVote
            } else {
                BackgroundRule::PerLabel
            };
            let mut out = inner.transfer_with(image, &transfers, &nu, background_fraction, rule)?;
            if posterior {
                posterior_in_place(&mut out.probabilities);
            }
            Ok::<_, keyfuse_core::KfError>(out)
        })?;
        Ok((
            out.labels.into_pyarray(py),
            out.probabilities.into_pyarray(py),
            out.total_weight.into_pyarray(py),
            out.n_groups,
        ))
    }
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
        if xyz.len() != n || scale.len() != n || labels.len() != n {
            return Err(invalid(
                py,
                format!(
                    "{n} descriptor sets, {} positions, {} scales, {} label sets",
                    xyz.len(),
                    scale.len(),
                    labels.len()
                ),
            ));
        }
        let sets = (0..n)
            .map(|i| {
                let kp = keypoints(py, "atlas", &descriptors[i], &xyz[i], &scale[i])?;
                let label = labels[i].as_array().to_vec();
                Ok((kp.desc.into_owned(), kp.xyz, kp.scale, label))
            })
            .collect::<PyResult<Vec<_>>>()?;
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

    /// Match test keypoints to every atlas (as `match_sets` per atlas, with the core's
    /// Hough and p(m) settings; with `hough_queries` > 0 the Hough mode is voted by at most
    /// about that many test keypoints); returns `(query, atlas, index, label, dist2, p,
    /// shift (n, 3) = x_test − x_atlas)`.
    #[pyo3(signature = (descriptors, xyz, scale, *, ratio, scale_factor, hough, hough_queries))]
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
        hough_queries: usize,
    ) -> PyResult<AtlasMatchOut<'py>> {
        let test = keypoints(py, "test", &descriptors, &xyz, &scale)?;
        let params = MatchParams {
            ratio,
            scale_factor,
            hough,
            ..MatchParams::default()
        };
        let inner = &self.inner;
        let m = detach(py, || inner.match_all(&test.view(), &params, hough_queries))?;
        let dist2: Vec<f32> = m.dist2.iter().map(|&v| v as f32).collect();
        Ok((
            m.query.into_pyarray(py),
            m.atlas.into_pyarray(py),
            m.index.into_pyarray(py),
            m.label.into_pyarray(py),
            dist2.into_pyarray(py),
            m.p.into_pyarray(py),
            rows_array(py, &m.shift)?,
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
