//! strait-discovery: how gateways learn the federation's services with no central broker.
//!
//! - [`model`]: the catalog's data model (services, ports, endpoints, members).
//! - [`state`]: the catalog as a sans-IO state machine (digests, deltas, tombstones,
//!   generations, leases), tested deterministically with simulated time.
//! - [`phi`]: phi accrual failure detection on heartbeats.
//!
//! The gossip exchange over mTLS gRPC and the local sources build on these.

pub mod model;
pub mod node;
pub mod phi;
pub mod seal;
pub mod source;
pub mod state;
pub mod wire;
