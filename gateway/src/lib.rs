//! strait-gateway: the QUIC mTLS tunnel between clusters, the service listeners that feed
//! it, the admin API, certificate reloading, and the local demo federation.

pub mod admin;
pub mod demo;
pub mod dns;
pub mod drill;
pub mod faults;
pub mod federation;
pub mod gateway;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod reload;
pub mod router;
pub mod routing;
pub mod status;
pub mod tunnel;

pub use gateway::{Gateway, raise_fd_limit};
