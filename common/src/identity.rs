//! SPIFFE identities of gateways: `spiffe://<trust-domain>/cluster/<cluster-id>/gateway`.

use std::fmt;

/// The identity a gateway's certificate carries as its URI SAN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayId {
    /// SPIFFE trust domain of the federation.
    pub trust_domain: String,
    /// Cluster the gateway serves.
    pub cluster: String,
}

/// Why a URI is not a gateway identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not a `spiffe://` URI.
    #[error("`{0}` is not a spiffe:// URI")]
    NotSpiffe(String),
    /// The trust domain part is malformed.
    #[error("`{0}` has an invalid trust domain")]
    BadTrustDomain(String),
    /// The path is not `/cluster/<id>/gateway`.
    #[error(
        "`{0}` is not a gateway identity (expected spiffe://<trust-domain>/cluster/<id>/gateway)"
    )]
    NotGateway(String),
}

impl GatewayId {
    /// A gateway identity; callers validate the parts (config validation does).
    pub fn new(trust_domain: &str, cluster: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            cluster: cluster.to_owned(),
        }
    }

    /// The SPIFFE URI.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Parses a SPIFFE URI as a gateway identity.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NotGateway(uri.to_owned()))?;
        if !is_trust_domain(td) {
            return Err(IdentityError::BadTrustDomain(uri.to_owned()));
        }
        let mut parts = path.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("cluster"), Some(cluster), Some("gateway"), None) if is_dns_label(cluster) => {
                Ok(Self::new(td, cluster))
            }
            _ => Err(IdentityError::NotGateway(uri.to_owned())),
        }
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/cluster/{}/gateway",
            self.trust_domain, self.cluster
        )
    }
}

/// RFC 1123 label: what Kubernetes requires of names and namespaces and DNS of labels.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = GatewayId::new("strait.example", "us-east");
        assert_eq!(id.uri(), "spiffe://strait.example/cluster/us-east/gateway");
        assert_eq!(GatewayId::parse(&id.uri()).unwrap(), id);
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "https://strait.example/cluster/a/gateway",
            "spiffe://strait.example/cluster/a",
            "spiffe://strait.example/cluster/a/gateway/extra",
            "spiffe://strait.example/ns/a/sa/b",
            "spiffe://Strait.Example/cluster/a/gateway",
            "spiffe://strait.example/cluster/A/gateway",
            "spiffe://strait.example",
        ] {
            assert!(GatewayId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn labels() {
        assert!(is_dns_label("us-east-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}
