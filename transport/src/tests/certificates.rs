//! Certificate files: what they say, and that nothing is overwritten.

use std::net::{IpAddr, Ipv4Addr};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

use crate::certificates::{
    CreateClusterCaError, IssueNodeCertificateError, LoadCertificatesError, NodeCertificates, Validity,
    create_cluster_ca, issue_node_certificate,
};
use crate::tests::support::init;

fn parse_pem(path: &std::path::Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

#[test]
fn the_ca_names_the_cluster_and_is_never_overwritten() {
    init();
    let directory = tempfile::tempdir().unwrap();
    let files = create_cluster_ca(directory.path(), "prod-eu").unwrap();
    let der = parse_pem(&files.certificate_path);
    let (_, certificate) = x509_parser::parse_x509_certificate(&der).unwrap();
    let subject = certificate.subject();
    assert_eq!(subject.iter_common_name().next().unwrap().as_str().unwrap(), "concord cluster prod-eu");
    assert_eq!(subject.iter_organizational_unit().next().unwrap().as_str().unwrap(), "prod-eu");
    assert!(certificate.is_ca());

    let again = create_cluster_ca(directory.path(), "prod-eu").unwrap_err();
    assert!(matches!(again, CreateClusterCaError::AlreadyExists { .. }));
    assert_eq!(parse_pem(&files.certificate_path), der, "the first CA is untouched");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_node_certificate_carries_its_names_and_both_key_usages() {
    init();
    let directory = tempfile::tempdir().unwrap();
    create_cluster_ca(directory.path(), "a").unwrap();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let files = issue_node_certificate(
        directory.path(),
        "node-7",
        &[ip],
        &["n7.example".to_owned()],
        Validity::days_from_now(30),
    )
    .unwrap();
    let der = parse_pem(&files.certificate_path);
    let (_, certificate) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(certificate.subject().iter_common_name().next().unwrap().as_str().unwrap(), "node-7");
    assert_eq!(certificate.subject().iter_organizational_unit().next().unwrap().as_str().unwrap(), "a");
    assert!(certificate.issuer().to_string().contains("concord cluster a"));
    let names = certificate.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert!(names.contains(&GeneralName::DNSName("node-7")));
    assert!(names.contains(&GeneralName::DNSName("n7.example")));
    assert!(names.contains(&GeneralName::IPAddress(&[10, 0, 0, 7])));
    let usage = certificate.extended_key_usage().unwrap().unwrap().value;
    assert!(usage.server_auth && usage.client_auth);
    assert!(!certificate.is_ca());

    let loaded = NodeCertificates::load(directory.path(), "node-7").unwrap();
    assert_eq!(loaded.cluster_id(), "a");
    assert_eq!(loaded.node_name(), "node-7");
    assert!(!format!("{loaded:?}").contains("PRIVATE"), "the key is never printed");
    loaded.server_config().unwrap();
    loaded.client_config().unwrap();

    let again = issue_node_certificate(directory.path(), "node-7", &[], &[], Validity::days_from_now(30)).unwrap_err();
    assert!(matches!(again, IssueNodeCertificateError::AlreadyExists { .. }));
}

#[test]
fn bad_names_and_missing_files_are_errors() {
    init();
    let directory = tempfile::tempdir().unwrap();
    for bad in ["", "has space", "../escape", "-dash", "x".repeat(49).as_str()] {
        assert!(create_cluster_ca(directory.path(), bad).is_err(), "cluster id {bad:?}");
    }
    let missing_ca = issue_node_certificate(directory.path(), "n1", &[], &[], Validity::days_from_now(1)).unwrap_err();
    assert!(matches!(missing_ca, IssueNodeCertificateError::Read { .. }));

    create_cluster_ca(directory.path(), "a").unwrap();
    for bad in ["", "ca", "CA", "a/b", ".hidden", "-dash", "x".repeat(64).as_str()] {
        let error = issue_node_certificate(directory.path(), bad, &[], &[], Validity::days_from_now(1)).unwrap_err();
        assert!(matches!(error, IssueNodeCertificateError::InvalidNodeName { .. }), "node name {bad:?}");
    }
    let backwards = Validity { not_before: std::time::SystemTime::now(), not_after: std::time::SystemTime::UNIX_EPOCH };
    let error = issue_node_certificate(directory.path(), "n1", &[], &[], backwards).unwrap_err();
    assert!(matches!(error, IssueNodeCertificateError::InvalidValidity));

    let missing = NodeCertificates::load(directory.path(), "nobody").unwrap_err();
    assert!(matches!(missing, LoadCertificatesError::Read { .. }));
    std::fs::write(directory.path().join("junk.pem"), "not pem").unwrap();
    std::fs::write(directory.path().join("junk.key"), "not pem").unwrap();
    let junk = NodeCertificates::load(directory.path(), "junk").unwrap_err();
    assert!(matches!(junk, LoadCertificatesError::InvalidPem { .. }));
}
