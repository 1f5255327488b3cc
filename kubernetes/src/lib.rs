//! Kubernetes mode: `ServiceExport`s are this cluster's exports, and every service the
//! federation offers becomes a `ServiceImport` plus a derived Service and EndpointSlices
//! pointing at the gateway pods. Everything goes through the real kube-rs client and
//! runtime (reflectors), so the tests drive the production code path against a fake API
//! server that speaks the HTTP list/watch protocol.

pub mod exports;
pub mod imports;
pub mod install;
pub mod lease;
pub mod mcs;
pub mod source;
pub mod watch;
