//! strait-gateway: the QUIC mTLS tunnel between clusters, the service listeners that feed
//! it, routing and failover, the `clusterset.local` DNS server, the admin API, certificate
//! rotation, drill fault injection, and the local demo federation.
//!
//! [`app`] assembles a [`Gateway`] from these parts; [`desired`] is the one state they all
//! follow. The public API is what the binary and the tests use: [`Gateway`], the demo, the
//! tunnel's wire pieces, and the metrics reference.

pub mod app;
pub mod demo;
pub mod memory;
pub mod metrics;
pub mod tunnel;

pub(crate) mod admin;
pub(crate) mod desired;
pub(crate) mod dns;
pub(crate) mod drain;
pub(crate) mod faults;
pub(crate) mod federation;
pub(crate) mod kubernetes;
pub(crate) mod lifetime;
pub(crate) mod listener;
pub(crate) mod rotation;
pub(crate) mod router;
pub(crate) mod routing;

pub use app::{Gateway, raise_fd_limit};

/// Entry points for the fuzz targets in `gateway/fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::desired::dns::{EndpointEntry, Kind, PortEntry, ServiceEntry};
    pub use crate::dns::zone::{Spec, Transport, Zone};
}
