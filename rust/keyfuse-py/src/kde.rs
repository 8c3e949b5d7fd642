//! Bindings for the fusion-model likelihoods (keyfuse_core::kde).

use keyfuse_core::kde::{self, KdeOptions};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::errors::detach;

/// log p({f_i}|C_k) per class (eqs. 5–7). See keyfuse_core::kde::keypoint_log_likelihood.
#[pyfunction]
#[pyo3(signature = (query, train, train_sample, sample_class, n_classes, *, exclude_sample, k,
    background, checks))]
#[allow(clippy::too_many_arguments)]
fn keypoint_log_likelihood<'py>(
    py: Python<'py>,
    query: PyReadonlyArray2<'py, u8>,
    train: PyReadonlyArray2<'py, u8>,
    train_sample: PyReadonlyArray1<'py, i64>,
    sample_class: PyReadonlyArray1<'py, i64>,
    n_classes: usize,
    exclude_sample: Option<usize>,
    k: Option<usize>,
    background: f64,
    checks: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (q, t) = (query.as_array(), train.as_array());
    let (ts, sc) = (train_sample.as_array(), sample_class.as_array());
    let opts = KdeOptions {
        background,
        k,
        checks,
    };
    let out = detach(py, || {
        kde::keypoint_log_likelihood(q, t, ts, sc, n_classes, exclude_sample, &opts)
    })?;
    Ok(out.into_pyarray(py))
}

/// One binding per element type of the core's vector likelihood (real and 0/1 vectors
/// share arguments and result; the element type picks the distance).
macro_rules! vector_likelihood_binding {
    ($(#[$doc:meta])* $name:ident, $elem:ty) => {
        $(#[$doc])*
        #[pyfunction]
        #[pyo3(signature = (query, train, train_class, n_classes, *, exclude, background))]
        fn $name<'py>(
            py: Python<'py>,
            query: PyReadonlyArray2<'py, $elem>,
            train: PyReadonlyArray2<'py, $elem>,
            train_class: PyReadonlyArray1<'py, i64>,
            n_classes: usize,
            exclude: Option<PyReadonlyArray1<'py, i64>>,
            background: f64,
        ) -> PyResult<Bound<'py, PyArray2<f64>>> {
            let (q, t, c) = (query.as_array(), train.as_array(), train_class.as_array());
            let ex: Option<Vec<i64>> = exclude.map(|e| e.as_array().to_vec());
            let opts = KdeOptions {
                background,
                ..Default::default()
            };
            let out = detach(py, || kde::vector_log_likelihood(q, t, c, n_classes, ex.as_deref(), &opts))?;
            Ok(out.into_pyarray(py))
        }
    };
}

vector_likelihood_binding!(
    /// log p(v|C_k) for real vectors (eqs. 8–9, Euclidean), shape (Q, n_classes).
    vector_log_likelihood,
    f64
);
vector_likelihood_binding!(
    /// log p(v|C_k) for 0/1 vectors (eqs. 8–9, Hamming), shape (Q, n_classes).
    binary_log_likelihood,
    u8
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(keypoint_log_likelihood, m)?)?;
    m.add_function(wrap_pyfunction!(vector_log_likelihood, m)?)?;
    m.add_function(wrap_pyfunction!(binary_log_likelihood, m)?)?;
    Ok(())
}
