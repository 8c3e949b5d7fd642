//! Bindings for keypoint-transfer segmentation: `TransferAtlases` (training label maps in
//! run form, built once) and `vote_labels`.

use keyfuse_core::segment::{AtlasSet, Transfer};
use numpy::{
    IntoPyArray, PyArray1, PyArray3, PyArray4, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
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
    m.add_function(wrap_pyfunction!(vote_labels, m)?)?;
    Ok(())
}
