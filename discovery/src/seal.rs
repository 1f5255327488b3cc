//! Signed origins. Each cluster signs what it publishes about itself: a *statement* of its
//! origin (cluster, generation, version, heartbeat, and a hash of its member details and
//! every entry, tombstones included), made again at every heartbeat. The signature and the
//! certificate that verifies it travel with the origin, through any number of relays.
//!
//! A member merges another cluster's origin only when the result is exactly what that
//! cluster signed: the certificate chains to the federation's roots and names that
//! cluster, and the statement matches the merged state. So a member can relay an origin
//! but never forge, alter or withdraw its services; and as a statement names its
//! heartbeat, which only grows, an old one replayed cannot hide a newer state.
//!
//! Deltas of an origin are therefore never cut short: a prefix of its entries would not
//! be what it signed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use strait_common::pki::{self, Identity, PkiError};

use crate::model::{MemberInfo, ServiceKey};
use crate::state::Entry;
use crate::wire;

/// An origin's signature over its current statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// Fingerprint of the certificate whose key signed.
    pub cert: u64,
    /// The signature scheme (TLS code point).
    pub scheme: u16,
    /// The signature.
    pub signature: Vec<u8>,
    /// The statement's content hash, sent only to replicas of the origin's own cluster:
    /// they keep none of its entries, yet must tell a genuine incarnation of their cluster
    /// from a claimed one.
    pub content: Option<[u8; 32]>,
}

/// A gateway's certificate chain (DER, leaf first) and the leaf's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// First 8 bytes of the leaf's SHA-256, big-endian; never 0. Names the certificate in
    /// digests and seals; never trusted alone (a held chain is compared whole).
    pub fingerprint: u64,
    /// The certificates.
    pub certs: Arc<[Vec<u8>]>,
    /// The leaf's expiry, once checked ([`Sealing::check_chain`]); statements it verifies
    /// are refused after it.
    pub not_after: Option<SystemTime>,
}

impl Chain {
    /// A chain of `certs` (leaf first; not empty).
    pub fn new(certs: Vec<Vec<u8>>) -> Chain {
        let hash = Sha256::digest(certs.first().map(Vec::as_slice).unwrap_or_default());
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&hash[..8]);
        Chain {
            // 0 means "no certificate" in digests.
            fingerprint: u64::from_be_bytes(fp).max(1),
            certs: certs.into(),
            not_after: None,
        }
    }

    /// Encoded size, for the delta budget.
    pub fn size(&self) -> usize {
        self.certs.iter().map(Vec::len).sum()
    }
}

/// What an origin signs.
#[derive(Debug, Clone, Copy)]
pub struct Statement<'a> {
    /// The origin's cluster.
    pub cluster: &'a str,
    /// Its generation.
    pub generation: u64,
    /// Its highest entry version.
    pub version: u64,
    /// Its heartbeat.
    pub heartbeat: u64,
    /// [`content_hash`] of its member details and entries.
    pub content: &'a [u8; 32],
    /// Fingerprint of the certificate that verifies the signature.
    pub cert: u64,
}

/// Something a member signs: its bytes, naming the certificate that vouches for them.
pub trait Signed {
    /// The exact bytes signed (each kind starts with its own tag, so one kind's signature
    /// never verifies as another's).
    fn bytes(&self) -> Vec<u8>;
    /// Fingerprint of the certificate that verifies the signature.
    fn cert(&self) -> u64;
}

impl Signed for Statement<'_> {
    fn cert(&self) -> u64 {
        self.cert
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + self.cluster.len());
        b.extend_from_slice(b"strait origin statement v1\0");
        put_str(&mut b, self.cluster);
        for n in [self.generation, self.version, self.heartbeat] {
            b.extend_from_slice(&n.to_be_bytes());
        }
        b.extend_from_slice(self.content);
        b.extend_from_slice(&self.cert.to_be_bytes());
        b
    }
}

/// What a gateway replica signs about itself (see [`crate::state::ReplicaRecord`]).
#[derive(Debug, Clone, Copy)]
pub struct ReplicaStatement<'a> {
    /// Its cluster.
    pub cluster: &'a str,
    /// Its name within the cluster.
    pub replica: &'a str,
    /// Its generation (start-up epoch).
    pub generation: u64,
    /// Its beat, which only grows within a generation.
    pub beat: u64,
    /// Its member details.
    pub info: &'a MemberInfo,
    /// Whether it is draining.
    pub draining: bool,
    /// Fingerprint of the certificate that verifies the signature.
    pub cert: u64,
}

impl Signed for ReplicaStatement<'_> {
    fn cert(&self) -> u64 {
        self.cert
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(160);
        b.extend_from_slice(b"strait replica statement v1\0");
        put_str(&mut b, self.cluster);
        put_str(&mut b, self.replica);
        for n in [self.generation, self.beat] {
            b.extend_from_slice(&n.to_be_bytes());
        }
        put_member(&mut b, self.info);
        b.push(u8::from(self.draining));
        b.extend_from_slice(&self.cert.to_be_bytes());
        b
    }
}

fn put_member(b: &mut Vec<u8>, info: &MemberInfo) {
    put_str(b, &info.region);
    put_str(b, &info.zone);
    put_str(b, &info.tunnel_addr.to_string());
    put_str(b, &info.gossip_addr.to_string());
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// SHA-256 over an origin's member details and every entry in key order (each service
/// as its protobuf encoding, whose maps are ordered): what its statement vouches for.
pub fn content_hash(info: &MemberInfo, entries: &BTreeMap<ServiceKey, Entry>) -> [u8; 32] {
    let mut b = Vec::new();
    put_member(&mut b, info);
    let mut h = Sha256::new();
    h.update(&b);
    for (key, entry) in entries {
        b.clear();
        put_str(&mut b, &key.namespace);
        put_str(&mut b, &key.name);
        b.extend_from_slice(&entry.version.to_be_bytes());
        match &entry.service {
            Some(s) => {
                b.push(1);
                let encoded = wire::service_to_pb(s).encode_to_vec();
                b.extend_from_slice(&(encoded.len() as u64).to_be_bytes());
                b.extend_from_slice(&encoded);
            }
            None => b.push(0),
        }
        h.update(&b);
    }
    h.finalize().into()
}

/// This member's key and certificate, and the federation's roots and trust domain that
/// every other origin's certificate is checked against.
pub struct Sealing {
    key: Arc<dyn rustls::sign::SigningKey>,
    chain: Chain,
    roots: Arc<RootCertStore>,
    /// Which roots: chains checked against other roots are checked again.
    roots_id: [u8; 32],
    trust_domain: String,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("cert", &self.chain.fingerprint)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Sealing {
    /// Seals with `identity`'s key and checks others against its roots.
    pub fn new(identity: &Identity) -> Result<Sealing, PkiError> {
        let mut roots_id = Sha256::new();
        for anchor in &identity.roots.roots {
            roots_id.update(anchor.subject.as_ref());
            roots_id.update(anchor.subject_public_key_info.as_ref());
        }
        Ok(Sealing {
            key: identity.signer()?,
            chain: Chain {
                // Checked when the identity was loaded; replicas sharing it verify with it.
                not_after: Some(identity.not_after),
                ..Chain::new(identity.certs.iter().map(|c| c.to_vec()).collect())
            },
            roots: identity.roots.clone(),
            roots_id: roots_id.finalize().into(),
            trust_domain: identity.id.trust_domain.clone(),
        })
    }

    /// Whether `other` trusts the same roots (then chains it checked still hold).
    pub fn same_roots(&self, other: &Sealing) -> bool {
        self.roots_id == other.roots_id && self.trust_domain == other.trust_domain
    }

    /// This member's certificate chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Signs `statement` (whose `cert` must be this member's fingerprint).
    pub fn seal(&self, statement: &impl Signed) -> Result<Seal, PkiError> {
        let (scheme, signature) = pki::sign(self.key.as_ref(), &statement.bytes())?;
        Ok(Seal {
            cert: self.chain.fingerprint,
            scheme,
            signature,
            content: None,
        })
    }

    /// `certs` as the chain of a gateway of `cluster` in this federation, or why not.
    pub fn check_chain(&self, cluster: &str, certs: &[Vec<u8>]) -> Result<Chain, String> {
        let ders: Vec<CertificateDer<'_>> = certs
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let not_after = pki::check_gateway_chain(&self.roots, &self.trust_domain, cluster, &ders)?;
        Ok(Chain {
            not_after: Some(not_after),
            ..Chain::new(certs.to_vec())
        })
    }

    /// Whether `seal` is `chain`'s signature over `statement`, and `chain` has not expired.
    pub fn verify(&self, chain: &Chain, statement: &impl Signed, seal: &Seal) -> bool {
        chain.not_after.is_some_and(|t| SystemTime::now() < t)
            && seal.cert == chain.fingerprint
            && statement.cert() == chain.fingerprint
            && chain.certs.first().is_some_and(|leaf| {
                pki::verify_signature(
                    &CertificateDer::from(leaf.as_slice()),
                    seal.scheme,
                    &statement.bytes(),
                    &seal.signature,
                )
            })
    }
}
