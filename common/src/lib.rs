//! strait-common: what every strait crate shares: the configuration model and its
//! validation, the admin API model, SPIFFE identities, the federation PKI, and telemetry setup.

pub mod api;
pub mod config;
pub mod identity;
pub mod pki;
pub mod telemetry;
pub mod units;

pub use config::Config;
pub use identity::GatewayId;
