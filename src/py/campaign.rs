//! `FuzzExecutor.fuzz`: the in-process fuzzing loop ([`crate::engine::campaign`]) with
//! the GIL released; Python is called only for findings and, about twice a second, for
//! the status (which may stop the campaign).

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::engine::campaign::{Campaign, ExecutorHarness, Findings, Options, Stats};
use crate::engine::fuzz::Executor;
use crate::engine::Result;
use crate::py::error::through_engine;
use crate::py::gil;

/// What `fuzz` was told, checked.
pub struct Request {
    pub seeds: Vec<Vec<u8>>,
    pub seed: u64,
    pub executions: Option<u64>,
    pub duration: Option<f64>,
    pub sync_dir: Option<PathBuf>,
    pub worker: String,
    pub status_every: f64,
    pub on_crash: Option<Py<PyAny>>,
    pub on_timeout: Option<Py<PyAny>>,
    pub on_status: Option<Py<PyAny>>,
}

/// The Python callbacks as [`Findings`].
struct PyFindings<'a> {
    on_crash: Option<&'a Py<PyAny>>,
    on_timeout: Option<&'a Py<PyAny>>,
    on_status: Option<&'a Py<PyAny>>,
}

fn call_with_bytes(f: Option<&Py<PyAny>>, input: &[u8]) -> Result<()> {
    let Some(f) = f else { return Ok(()) };
    gil::attached(|py| f.call1(py, (PyBytes::new(py, input),)).map(drop)).map_err(through_engine)
}

impl Findings for PyFindings<'_> {
    fn crash(&mut self, input: &[u8], _bucket: u64) -> Result<()> {
        call_with_bytes(self.on_crash, input)
    }

    fn timeout(&mut self, input: &[u8]) -> Result<()> {
        call_with_bytes(self.on_timeout, input)
    }

    fn keep_going(&mut self, stats: &Stats) -> Result<bool> {
        gil::attached(|py| -> PyResult<bool> {
            py.check_signals()?;
            let Some(f) = self.on_status else {
                return Ok(true);
            };
            let ret = f.call1(py, (stats_dict(py, stats)?,))?;
            // None (or anything true) goes on; False stops.
            Ok(ret.is_none(py) || ret.bind(py).is_truthy()?)
        })
        .map_err(through_engine)
    }
}

/// The stats as a dict (the face's `FuzzStats` is built from it).
pub fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("executions", s.executions)?;
    d.set_item("corpus", s.corpus)?;
    d.set_item("blocks_covered", s.covered)?;
    d.set_item("crash_buckets", s.crash_buckets)?;
    d.set_item("crashes", s.crashes)?;
    d.set_item("timeouts", s.timeouts)?;
    d.set_item("last_new_coverage", s.last_new_coverage)?;
    d.set_item("imported", s.imported)?;
    d.set_item("seconds", s.elapsed.as_secs_f64())?;
    Ok(d)
}

fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    if !(value.is_finite() && (0.0..=1e9).contains(&value)) {
        return Err(PyValueError::new_err(format!(
            "{what} must be a number of seconds from 0 to 1e9, got {value}"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Runs a campaign on `executor` and returns its final stats.
pub fn fuzz<'py>(
    py: Python<'py>,
    executor: &Executor,
    request: Request,
) -> PyResult<Bound<'py, PyDict>> {
    let on_signal =
        || -> Result<()> { gil::attached(|py| py.check_signals()).map_err(through_engine) };
    let options = Options {
        seed: request.seed,
        max_len: executor.config.max_len,
        map_size: ExecutorHarness::map_size(executor),
        executions: request.executions,
        duration: request
            .duration
            .map(|d| seconds(d, "duration"))
            .transpose()?,
        poll_every: seconds(request.status_every, "status_every")?,
        sync_dir: request.sync_dir,
        worker: request.worker,
    };
    if options.executions.is_none() && options.duration.is_none() && request.on_status.is_none() {
        return Err(PyValueError::new_err(
            "give executions, duration or an on_status callback that can stop the campaign",
        ));
    }
    let campaign = Campaign::new(options, request.seeds)?;
    let mut findings = PyFindings {
        on_crash: request.on_crash.as_ref(),
        on_timeout: request.on_timeout.as_ref(),
        on_status: request.on_status.as_ref(),
    };
    let stats = gil::released(py, || {
        let mut harness = ExecutorHarness::new(executor, Some(&on_signal));
        campaign.run(&mut harness, &mut findings)
    });
    stats_dict(py, &stats?)
}
