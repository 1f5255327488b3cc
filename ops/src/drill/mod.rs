//! Failover drills: a scenario file injects faults into a running federation through the
//! gateways' admin APIs while built-in load runs, and the report says whether the
//! federation met its objectives.
//!
//! [`scenario`] parses and checks the file, [`run`] drives it, [`analysis`] turns what was
//! recorded into the report (no I/O), [`render`] draws it, [`progress`] shows it live.

pub mod analysis;
mod process;
pub mod progress;
pub mod render;
mod run;
pub mod scenario;

pub use analysis::Report;
pub use run::{run, run_with_progress, write_report};
pub use scenario::Scenario;

#[cfg(test)]
mod tests;
