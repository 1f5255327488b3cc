use std::time::{Duration, SystemTime};

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn write_identity(
    dir: &Path,
    ca: &CertificateAuthority,
    cert: &IssuedCert,
) -> (PathBuf, PathBuf, PathBuf) {
    let (c, k, a) = (dir.join("gw.pem"), dir.join("gw.key"), dir.join("ca.pem"));
    std::fs::write(&c, &cert.cert_pem).unwrap();
    std::fs::write(&k, &cert.key_pem).unwrap();
    std::fs::write(&a, &ca.cert_pem).unwrap();
    (a, c, k)
}

#[test]
fn issued_certificate_carries_the_spiffe_id_and_loads() {
    let ca = CertificateAuthority::generate("strait.example", DAY).unwrap();
    let id = GatewayId::new("strait.example", "us-east");
    let cert = ca.issue_gateway_for(&id, DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, c, k) = write_identity(dir.path(), &ca, &cert);
    let loaded = Identity::load(&a, &c, &k, &id).unwrap();
    assert_eq!(loaded.id, id);
    assert!(loaded.not_after > SystemTime::now() + DAY / 2);
    assert!(!loaded.serial.is_empty());
    loaded.server_config().unwrap();
    loaded.client_config("eu-west").unwrap();
}

#[test]
fn load_refuses_wrong_identity_expired_and_foreign_certificates() {
    let ca = CertificateAuthority::generate("strait.example", DAY).unwrap();
    let me = GatewayId::new("strait.example", "us-east");
    let dir = tempfile::tempdir().unwrap();

    let other = ca
        .issue_gateway_for(&GatewayId::new("strait.example", "eu-west"), DAY)
        .unwrap();
    let (a, c, k) = write_identity(dir.path(), &ca, &other);
    let e = Identity::load(&a, &c, &k, &me).unwrap_err().to_string();
    assert!(
        e.contains("carries identity spiffe://strait.example/cluster/eu-west/gateway"),
        "{e}"
    );
    assert!(e.contains("strait pki issue --cluster us-east"), "{e}");

    let now = SystemTime::now();
    let expired = ca.issue_gateway(&me, now - 2 * DAY, now - DAY).unwrap();
    let (a, c, k) = write_identity(dir.path(), &ca, &expired);
    let e = Identity::load(&a, &c, &k, &me).unwrap_err().to_string();
    assert!(e.contains("has expired"), "{e}");

    let foreign = CertificateAuthority::generate("strait.example", DAY)
        .unwrap()
        .issue_gateway_for(&me, DAY)
        .unwrap();
    let (a, c, k) = write_identity(dir.path(), &ca, &foreign);
    let e = Identity::load(&a, &c, &k, &me).unwrap_err().to_string();
    assert!(e.contains("does not verify against the CA bundle"), "{e}");
}

#[test]
fn load_explains_unusable_files() {
    let dir = tempfile::tempdir().unwrap();
    let me = GatewayId::new("strait.example", "us-east");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let e = Identity::load(&junk, &junk, &junk, &me)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("junk.pem") && e.contains("contains no CA certificate"),
        "{e}"
    );
    let e = Identity::load(&dir.path().join("missing.pem"), &junk, &junk, &me)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
}

#[test]
fn ca_round_trips_through_its_directory_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("strait.example", DAY).unwrap();
    ca.save(dir.path()).unwrap();
    let again = CertificateAuthority::load(dir.path()).unwrap();
    let id = GatewayId::new("strait.example", "ap-south");
    let cert = again.issue_gateway_for(&id, DAY).unwrap();
    let (a, c, k) = write_identity(dir.path(), &ca, &cert);
    assert_eq!(
        Identity::load(&a, &c, &k, &id).unwrap().id,
        id,
        "a reloaded CA issues certificates its bundle verifies"
    );
    assert!(
        ca.save(dir.path())
            .unwrap_err()
            .to_string()
            .contains("a CA already exists")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
    }
}
