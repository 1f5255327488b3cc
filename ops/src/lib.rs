//! strait-ops: the operator tools that talk to gateways only through their admin API —
//! `strait status`, failover drills, and the load generator they use. Nothing here links
//! the data plane; what a tool knows of a gateway is the [`strait_common::api`] model.

pub mod check;
pub mod client;
pub mod drill;
pub mod load;
pub mod status;
