//! Federation PKI: a root CA, gateway certificates with SPIFFE URI SANs, and rustls
//! configurations that verify both the chain and the SPIFFE identity of the peer.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsName, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use time::OffsetDateTime;

use crate::identity::GatewayId;

/// ALPN protocol of the strait tunnel.
pub const ALPN: &[u8] = b"strait/1";

/// A PKI failure: which file or certificate, what is wrong, and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: {problem}; fix: {fix}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the material.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

fn bad_file(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> PkiError {
    PkiError::BadFile {
        path: path.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Reads one of a gateway's TLS files (`field` is its config key); a missing or unreadable
/// one is a [`PkiError::BadFile`] that says what to do (`missing`: how to make it).
fn read_tls(path: &Path, field: &str, missing: &str) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|e| {
        let fix = match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{missing}, or correct {field} (a relative path is relative to the config file)"
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "let the user running strait read it (e.g. `chown` it to that user, or `chmod 640` with its group), or correct {field}"
            ),
            _ => format!("check the file {field} names"),
        };
        bad_file(path, format!("cannot be read ({field}): {e}"), fix)
    })
}

/// Writes a file atomically (temp file + rename) so a reloading gateway never sees half of it.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A federation root CA: its certificate and signing key, both PEM.
pub struct CertificateAuthority {
    /// CA certificate (PEM).
    pub cert_pem: String,
    /// CA private key (PEM).
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// A certificate and key issued to a gateway, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

impl IssuedCert {
    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (mode 0600), each atomically.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        write_atomic(
            &dir.join(format!("{name}.pem")),
            self.cert_pem.as_bytes(),
            false,
        )?;
        write_atomic(
            &dir.join(format!("{name}.key")),
            self.key_pem.as_bytes(),
            true,
        )
    }
}

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

impl CertificateAuthority {
    /// Creates a new root CA for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "strait federation");
        dn.push(
            DnType::CommonName,
            format!("strait root CA for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + validity;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// Loads a CA from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// Loads a CA from a directory made by [`CertificateAuthority::save`].
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert = read(&dir.join(CA_CERT_FILE))?;
        let key = read(&dir.join(CA_KEY_FILE))?;
        let as_text = |b: Vec<u8>, f: &str| {
            String::from_utf8(b).map_err(|_| {
                bad_file(
                    &dir.join(f),
                    "is not PEM text",
                    "point at the directory made by `strait pki init`",
                )
            })
        };
        Self::from_pem(&as_text(cert, CA_CERT_FILE)?, &as_text(key, CA_KEY_FILE)?).map_err(|e| {
            match e {
                PkiError::Generate(g) => bad_file(
                    dir,
                    format!("does not hold a usable CA: {g}"),
                    "run `strait pki init` to create one",
                ),
                other => other,
            }
        })
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`; refuses to overwrite a CA.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(bad_file(
                &key_path,
                "a CA already exists here",
                "choose another directory, or delete the old CA on purpose",
            ));
        }
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_atomic(&key_path, self.key_pem.as_bytes(), true)
    }

    /// Issues a gateway certificate for `id`, valid from `not_before` to `not_after`.
    pub fn issue_gateway(
        &self,
        id: &GatewayId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "strait federation");
        dn.push(DnType::CommonName, format!("{} gateway", id.cluster));
        params.distinguished_name = dn;
        let uri = id.uri().try_into().map_err(|_| {
            bad_file(
                Path::new("-"),
                "identity is not ASCII",
                "use lowercase ASCII ids",
            )
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a gateway certificate valid from five minutes ago for `validity`.
    pub fn issue_gateway_for(
        &self,
        id: &GatewayId,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let now = SystemTime::now();
        self.issue_gateway(id, now - Duration::from_secs(300), now + validity)
    }
}

/// A gateway's loaded identity: certificate chain, key, trust anchors, and what they say.
#[derive(Clone)]
pub struct Identity {
    /// Who this gateway is, as its certificate says.
    pub id: GatewayId,
    /// Certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Trust anchors for peers.
    pub roots: Arc<RootCertStore>,
    /// The leaf's expiry.
    pub not_after: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads and checks an identity from PEM files: the leaf must carry
    /// `expected`'s SPIFFE ID, chain to the CA bundle and be valid now.
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        expected: &GatewayId,
    ) -> Result<Self, PkiError> {
        let issue = format!(
            "issue it with `strait pki issue --ca <ca dir> --cluster {} --out <dir>`",
            expected.cluster
        );
        let ca_pem = read_tls(
            ca,
            "tls.ca",
            "copy the federation's ca.pem here (`strait pki init` made it)",
        )?;
        let cert_pem = read_tls(cert, "tls.cert", &issue)?;
        let key_pem = read_tls(key, "tls.key", &issue)?;
        let roots = roots_from_pem(ca, &ca_pem)?;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                bad_file(
                    cert,
                    format!("is not a PEM certificate chain: {e}"),
                    "use the .pem written by `strait pki issue`",
                )
            })?;
        if certs.is_empty() {
            return Err(bad_file(
                cert,
                "contains no certificate",
                "use the .pem written by `strait pki issue`",
            ));
        }
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            bad_file(
                key,
                format!("holds no private key: {e}"),
                "use the .key written by `strait pki issue`",
            )
        })?;
        let identity = Self::from_parts(certs, key_der, roots).map_err(|problem| {
            bad_file(cert, problem, "issue a certificate with `strait pki issue`")
        })?;
        if identity.id != *expected {
            return Err(bad_file(
                cert,
                format!(
                    "carries identity {} but this gateway is {expected}",
                    identity.id
                ),
                format!(
                    "issue a certificate for this cluster: `strait pki issue --cluster {}`",
                    expected.cluster
                ),
            ));
        }
        let provider = provider();
        let parsed = ParsedCertificate::try_from(&identity.certs[0])
            .map_err(|e| bad_file(cert, e.to_string(), "re-issue the certificate"))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &identity.roots,
            &identity.certs[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => bad_file(
                cert,
                "has expired",
                format!(
                    "issue a fresh one: `strait pki issue --cluster {}`",
                    expected.cluster
                ),
            ),
            other => bad_file(
                cert,
                format!(
                    "does not verify against the CA bundle {}: {other}",
                    ca.display()
                ),
                "issue it from the federation CA, or fix tls.ca",
            ),
        })?;
        Ok(identity)
    }

    /// Builds an identity from parsed parts without checking validity or chain (for
    /// tools and tests that need a deliberately bad identity).
    pub fn from_parts(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, String> {
        let leaf = certs.first().ok_or("contains no certificate")?;
        let info = leaf_info(leaf)?;
        let id = info
            .id
            .ok_or("carries no SPIFFE gateway identity (URI SAN)")?;
        Ok(Self {
            id,
            certs,
            key: Arc::new(key),
            roots: Arc::new(roots),
            not_after: info.not_after,
            serial: info.serial,
        })
    }

    /// A signer with this identity's private key, for what the gateway vouches for
    /// outside TLS (its catalog origin). Verified by [`verify_signature`] against the leaf.
    pub fn signer(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, PkiError> {
        Ok(provider()
            .key_provider
            .load_private_key(self.key.clone_key())?)
    }

    /// Builds an identity from PEM text (no validity checks; see [`Identity::from_parts`]).
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let roots = roots_from_pem(Path::new("-"), ca_pem.as_bytes()).map_err(|e| e.to_string())?;
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
        Self::from_parts(certs, key, roots)
    }

    /// Server-side TLS config: requires a client certificate from the CA with a gateway
    /// identity in this trust domain. The caller's cluster is read after the handshake.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = provider();
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
        let verifier = SpiffeClientVerifier {
            inner,
            trust_domain: self.id.trust_domain.clone(),
            own_cluster: self.id.cluster.clone(),
        };
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    /// Client-side TLS config for connecting to the gateway of `peer_cluster`: the server
    /// must chain to the CA and carry exactly that cluster's identity.
    pub fn client_config(&self, peer_cluster: &str) -> Result<rustls::ClientConfig, PkiError> {
        self.client_config_for(Some(peer_cluster))
    }

    /// Client-side TLS config that verifies the chain and requires a gateway identity of
    /// this trust domain (`peer_cluster: None`, for seed addresses whose cluster is not
    /// known yet), or exactly `peer_cluster`'s.
    pub fn client_config_for(
        &self,
        peer_cluster: Option<&str>,
    ) -> Result<rustls::ClientConfig, PkiError> {
        let provider = provider();
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            trust_domain: self.id.trust_domain.clone(),
            cluster: peer_cluster.map(str::to_owned),
            own_cluster: self.id.cluster.clone(),
            algs: provider.signature_verification_algorithms,
        };
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Signature schemes a gateway signs with, best first (its key decides which applies).
const SIGNING_SCHEMES: &[rustls::SignatureScheme] = &[
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ED25519,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::RSA_PSS_SHA256,
];

/// Signs `msg` with `key`: the scheme (its TLS code point) and the signature.
pub fn sign(key: &dyn rustls::sign::SigningKey, msg: &[u8]) -> Result<(u16, Vec<u8>), PkiError> {
    let signer = key.choose_scheme(SIGNING_SCHEMES).ok_or_else(|| {
        PkiError::Tls(rustls::Error::General(
            "no signature scheme for this key".into(),
        ))
    })?;
    let sig = signer.sign(msg)?;
    Ok((u16::from(signer.scheme()), sig))
}

/// Whether `signature` (made with `scheme`) over `msg` verifies with the public key of
/// `leaf`, a certificate already checked by [`check_gateway_chain`].
pub fn verify_signature(
    leaf: &CertificateDer<'_>,
    scheme: u16,
    msg: &[u8],
    signature: &[u8],
) -> bool {
    let scheme = rustls::SignatureScheme::from(scheme);
    if !SIGNING_SCHEMES.contains(&scheme) {
        return false;
    }
    let provider = provider();
    let Some((_, algs)) = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
    else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    algs.iter()
        .any(|alg| cert.verify_signature(*alg, msg, signature).is_ok())
}

/// Checks that `chain` (leaf first) is a gateway certificate of `cluster` in
/// `trust_domain`, chained to `roots` and valid now, as the tunnel and gossip verifiers do
/// for a connection. For data a gateway signed and others relayed. The leaf's expiry.
pub fn check_gateway_chain(
    roots: &RootCertStore,
    trust_domain: &str,
    cluster: &str,
    chain: &[CertificateDer<'_>],
) -> Result<SystemTime, String> {
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )
    .map_err(|e| e.to_string())?;
    let got = peer_id(leaf)?;
    let expected = GatewayId::new(trust_domain, cluster);
    if got != expected {
        return Err(format!("expected {expected}, the certificate is {got}"));
    }
    Ok(leaf_info(leaf)?.not_after)
}

/// The crypto provider used throughout (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A trust bundle of several federation roots (PEM), for a root rotation: every CA
/// certificate of `roots` (each a `ca.pem`, with the path for errors), once each, in
/// order. Each must be a CA certificate.
pub fn bundle(roots: &[(PathBuf, String)]) -> Result<String, PkiError> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    for (path, pem) in roots {
        let not_ca = |problem: String| {
            bad_file(
                path,
                problem,
                "give the CA's ca.pem (made by `strait pki init`), not a gateway certificate",
            )
        };
        let mut found = 0;
        for block in pem.split_inclusive(END).filter(|b| b.contains(END)) {
            let block = block[block.find("-----BEGIN").unwrap_or(0)..].trim();
            let der = CertificateDer::from_pem_slice(block.as_bytes())
                .map_err(|e| not_ca(format!("is not PEM: {e}")))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| not_ca(format!("holds an unreadable certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(not_ca("holds a certificate that is not a CA".into()));
            }
            found += 1;
            if seen.insert(der.to_vec()) {
                out.push_str(block);
                out.push('\n');
            }
        }
        if found == 0 {
            return Err(not_ca("contains no CA certificate".into()));
        }
    }
    Ok(out)
}

fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| {
            bad_file(
                path,
                format!("is not a PEM CA bundle: {e}"),
                "point tls.ca at the ca.pem made by `strait pki init`",
            )
        })?;
        roots.add(cert).map_err(|e| {
            bad_file(
                path,
                format!("holds an unusable CA certificate: {e}"),
                "point tls.ca at the ca.pem made by `strait pki init`",
            )
        })?;
    }
    if roots.is_empty() {
        return Err(bad_file(
            path,
            "contains no CA certificate",
            "point tls.ca at the ca.pem made by `strait pki init`",
        ));
    }
    Ok(roots)
}

struct LeafInfo {
    id: Option<GatewayId>,
    not_after: SystemTime,
    serial: String,
}

fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("is not an X.509 certificate: {e}"))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    let serial = cert.raw_serial_as_string().replace(':', "");
    Ok(LeafInfo {
        id: spiffe_id(&cert).ok(),
        not_after,
        serial,
    })
}

/// The gateway identity in a certificate: SPIFFE requires exactly one URI SAN.
fn spiffe_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<GatewayId, String> {
    use x509_parser::extensions::GeneralName;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => GatewayId::parse(uri).map_err(|e| e.to_string()),
        (None, _) => Err("no URI SAN".to_owned()),
        (Some(_), Some(_)) => Err("more than one URI SAN".to_owned()),
    }
}

/// The gateway identity of a verified peer certificate.
pub fn peer_id(der: &CertificateDer<'_>) -> Result<GatewayId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    spiffe_id(&cert)
}

fn identity_error(problem: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        SpiffeError(problem),
    ))))
}

/// A peer presenting this gateway's own cluster identity: only a copy of this gateway's
/// key (or a misconfigured seed pointing at itself) can do that, and no peer needs it.
fn own_identity(got: &GatewayId) -> rustls::Error {
    identity_error(format!(
        "the peer presented this gateway's own identity {got}; a peer must be another cluster (a seed pointing at this gateway itself, or a copied key)"
    ))
}

#[derive(Debug)]
struct SpiffeError(String);

impl fmt::Display for SpiffeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SPIFFE identity rejected: {}", self.0)
    }
}

impl std::error::Error for SpiffeError {}

/// Verifies a peer gateway's server certificate: chain to the federation CA, then the
/// SPIFFE ID must be a gateway of our trust domain and, when known, exactly the expected
/// cluster's. The TLS server name is
/// ignored; the SPIFFE ID replaces hostname checks.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    cluster: Option<String>,
    /// This gateway's own cluster: a peer never presents it.
    own_cluster: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let got = peer_id(end_entity).map_err(identity_error)?;
        let expected = match &self.cluster {
            Some(c) => GatewayId::new(&self.trust_domain, c).to_string(),
            None => format!("a gateway of trust domain {}", self.trust_domain),
        };
        let cluster_ok = self.cluster.as_deref().is_none_or(|c| c == got.cluster);
        if got.trust_domain != self.trust_domain || !cluster_ok {
            return Err(identity_error(format!(
                "expected {expected}, peer presented {got}"
            )));
        }
        if got.cluster == self.own_cluster {
            return Err(own_identity(&got));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a connecting gateway's client certificate: chain (via webpki), then a gateway
/// SPIFFE ID in our trust domain. Which services it may reach is decided per stream.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    /// This gateway's own cluster: a peer never presents it.
    own_cluster: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = peer_id(end_entity).map_err(identity_error)?;
        if got.trust_domain != self.trust_domain {
            return Err(identity_error(format!(
                "trust domain {} is not {}",
                got.trust_domain, self.trust_domain
            )));
        }
        if got.cluster == self.own_cluster {
            return Err(own_identity(&got));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests;
