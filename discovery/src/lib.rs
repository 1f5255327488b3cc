//! strait-discovery: where a gateway learns which services exist in the federation.
//!
//! Today the only source is the gateway's own configuration file (static peers and
//! imports); the gossip/gRPC exchange, membership and the federated catalog land here
//! next (see docs/ARCHITECTURE.md, "Discovery").
