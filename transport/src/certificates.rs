//! Cluster certificates: one certificate authority (CA) per cluster, one certificate per node.
//!
//! This module writes and reads PEM files in a certificates directory. It does not run TLS; the
//! [`crate::tls`] module turns what [`NodeCertificates::load`] reads into rustls configurations.
//!
//! # Files
//!
//! | file          | written by                   | holds                                       |
//! | ------------- | ---------------------------- | ------------------------------------------- |
//! | `ca.pem`      | [`create_cluster_ca`]        | the cluster CA certificate (every node)     |
//! | `ca.key`      | [`create_cluster_ca`]        | the CA private key (only where you issue)   |
//! | `<name>.pem`  | [`issue_node_certificate`]   | the node certificate                        |
//! | `<name>.key`  | [`issue_node_certificate`]   | the node private key                        |
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM, written with mode 0600 on Unix. Nothing is overwritten:
//! issuing again for a name that has files is an error, so a CA can never be replaced by
//! accident. To reissue a node certificate, remove its two files first.
//!
//! # What the certificates say
//!
//! The CA's subject is `CN=concord cluster <cluster id>, O=concord, OU=<cluster id>`: the
//! organizational unit carries the cluster id exactly, and [`NodeCertificates::cluster_id`]
//! reads it back from there. A node certificate's subject is `CN=<node name>, O=concord,
//! OU=<cluster id>`; its subject alternative names are the node name (as a DNS name), then the
//! given IP addresses and DNS names. It may be used for both TLS server and client
//! authentication, since every node both accepts and dials.
//!
//! Peers are not checked against a name: any certificate the cluster CA signed is a member of
//! the cluster (see [`crate::tls`]). There is no revocation list; to remove a node for good,
//! rotate the CA.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate's file name in a certificates directory.
pub const CA_CERTIFICATE_FILE: &str = "ca.pem";
/// The CA private key's file name in a certificates directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a cluster CA is valid: ten years.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// A sensible validity for node certificates when the operator does not choose one: one year.
pub const NODE_CERTIFICATE_DAYS_DEFAULT: u32 = 365;
/// The longest cluster id, so that `concord cluster <id>` fits the 64 characters X.509 allows a
/// common name.
pub const CLUSTER_ID_BYTES_MAX: usize = 48;
/// The longest node name (a DNS label's limit, and the common name's with room to spare).
pub const NODE_NAME_BYTES_MAX: usize = 63;

/// How far back `not_before` is set from now, so that a peer whose clock is a little behind
/// accepts a certificate issued a moment ago.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The first moment the certificate is valid.
    pub not_before: SystemTime,
    /// The last moment the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from an hour ago (clock skew between nodes) until `days` days from now.
    pub fn days_from_now(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now),
            not_after: now + Duration::from_secs(u64::from(days) * 24 * 60 * 60),
        }
    }
}

/// The two files a creation wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFiles {
    /// The certificate, PEM.
    pub certificate_path: PathBuf,
    /// The private key, PEM (PKCS#8).
    pub key_path: PathBuf,
}

/// Why [`create_cluster_ca`] wrote nothing (or, for `Write`, possibly only the key, which it
/// then removes).
#[derive(Debug, thiserror::Error)]
pub enum CreateClusterCaError {
    /// The cluster id is empty, too long, or has a character other than ASCII letters, digits,
    /// `-`, `_` and `.`.
    #[error("invalid cluster id {cluster_id:?}: {problem}")]
    InvalidClusterId { cluster_id: String, problem: &'static str },
    /// `ca.pem` or `ca.key` is already there; nothing was changed.
    #[error("{} already exists; a cluster CA is never overwritten", path.display())]
    AlreadyExists { path: PathBuf },
    /// Key generation or signing failed.
    #[error("could not generate the CA certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Creating the directory or writing a file failed.
    #[error("could not write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// Why [`issue_node_certificate`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum IssueNodeCertificateError {
    /// The node name is empty, too long, `ca`, or has a character other than ASCII letters,
    /// digits, `-`, `_` and `.` (it becomes a file name and a DNS name).
    #[error("invalid node name {name:?}: {problem}")]
    InvalidNodeName { name: String, problem: &'static str },
    /// `not_after` is not later than `not_before`.
    #[error("the validity period ends before it starts")]
    InvalidValidity,
    /// A DNS name is not ASCII.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),
    /// `<name>.pem` or `<name>.key` is already there; nothing was changed.
    #[error("{} already exists; remove the node's certificate and key to reissue", path.display())]
    AlreadyExists { path: PathBuf },
    /// The CA certificate or key could not be read.
    #[error("could not read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The CA certificate or key could not be parsed, or has no cluster id.
    #[error("invalid CA in {}: {problem}", path.display())]
    InvalidCa { path: PathBuf, problem: String },
    /// Key generation or signing failed.
    #[error("could not generate the node certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("could not write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// Why [`NodeCertificates::load`] could not load a node's certificates.
#[derive(Debug, thiserror::Error)]
pub enum LoadCertificatesError {
    /// The node name is not one [`issue_node_certificate`] accepts.
    #[error("invalid node name {name:?}: {problem}")]
    InvalidNodeName { name: String, problem: &'static str },
    /// A file could not be read.
    #[error("could not read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A file holds no usable PEM certificate or key.
    #[error("invalid PEM in {}: {problem}", path.display())]
    InvalidPem { path: PathBuf, problem: String },
    /// The CA certificate does not name a cluster id in its organizational unit.
    #[error("the CA certificate {} names no cluster id: {problem}", path.display())]
    NoClusterId { path: PathBuf, problem: String },
}

/// Creates a cluster CA in `directory` (created if missing): writes `ca.pem` and `ca.key`.
///
/// The CA is valid for [`CA_VALIDITY_DAYS`] and may sign node certificates only (path length
/// 0). Refuses to overwrite an existing CA.
pub fn create_cluster_ca(directory: &Path, cluster_id: &str) -> Result<WrittenFiles, CreateClusterCaError> {
    validate_cluster_id(cluster_id)
        .map_err(|problem| CreateClusterCaError::InvalidClusterId { cluster_id: cluster_id.to_owned(), problem })?;
    let files =
        WrittenFiles { certificate_path: directory.join(CA_CERTIFICATE_FILE), key_path: directory.join(CA_KEY_FILE) };
    for path in [&files.certificate_path, &files.key_path] {
        if path.exists() {
            return Err(CreateClusterCaError::AlreadyExists { path: path.clone() });
        }
    }

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&format!("concord cluster {cluster_id}"), cluster_id);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let validity = Validity::days_from_now(CA_VALIDITY_DAYS);
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    params.serial_number = Some(random_serial_number());
    let certificate = params.self_signed(&key)?;

    fs::create_dir_all(directory)
        .map_err(|source| CreateClusterCaError::Write { path: directory.to_owned(), source })?;
    write_pair(&files, &certificate.pem(), &key.serialize_pem())
        .map_err(|(path, source)| CreateClusterCaError::Write { path, source })?;
    Ok(files)
}

/// Issues a certificate for node `name`, signed by the CA in `directory`: writes `<name>.pem`
/// and `<name>.key` there.
///
/// The subject alternative names are `name` (as a DNS name), then `ip_addresses`, then
/// `dns_names`. Refuses to overwrite existing files for `name`.
pub fn issue_node_certificate(
    directory: &Path,
    name: &str,
    ip_addresses: &[IpAddr],
    dns_names: &[String],
    validity: Validity,
) -> Result<WrittenFiles, IssueNodeCertificateError> {
    validate_node_name(name)
        .map_err(|problem| IssueNodeCertificateError::InvalidNodeName { name: name.to_owned(), problem })?;
    if validity.not_after <= validity.not_before {
        return Err(IssueNodeCertificateError::InvalidValidity);
    }
    let files = node_files(directory, name);
    for path in [&files.certificate_path, &files.key_path] {
        if path.exists() {
            return Err(IssueNodeCertificateError::AlreadyExists { path: path.clone() });
        }
    }

    let ca_certificate_path = directory.join(CA_CERTIFICATE_FILE);
    let ca_key_path = directory.join(CA_KEY_FILE);
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| IssueNodeCertificateError::Read { path: path.to_owned(), source })
    };
    let ca_certificate_pem = read(&ca_certificate_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    let invalid_ca =
        |path: &Path, problem: String| IssueNodeCertificateError::InvalidCa { path: path.to_owned(), problem };
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|error| invalid_ca(&ca_key_path, error.to_string()))?;
    let ca_der = CertificateDer::from_pem_slice(ca_certificate_pem.as_bytes())
        .map_err(|error| invalid_ca(&ca_certificate_path, error.to_string()))?;
    let cluster_id = cluster_id_of(&ca_der).map_err(|problem| invalid_ca(&ca_certificate_path, problem))?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)
        .map_err(|error| invalid_ca(&ca_certificate_path, error.to_string()))?;

    let mut params = CertificateParams::default();
    params.distinguished_name = subject(name, &cluster_id);
    params.subject_alt_names = subject_alt_names(name, ip_addresses, dns_names)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    params.serial_number = Some(random_serial_number());
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, &issuer)?;

    write_pair(&files, &certificate.pem(), &key.serialize_pem())
        .map_err(|(path, source)| IssueNodeCertificateError::Write { path, source })?;
    Ok(files)
}

/// What a node needs for TLS: the cluster CA, its own certificate and its private key.
///
/// Load it with [`NodeCertificates::load`]; turn it into rustls configurations with
/// [`NodeCertificates::server_config`] and [`NodeCertificates::client_config`] (in
/// [`crate::tls`]), or hand it to [`crate::EndpointConfig`].
#[derive(Clone)]
pub struct NodeCertificates {
    /// The cluster id read from the CA's organizational unit.
    pub(crate) cluster_id: String,
    /// The name the files were loaded for.
    pub(crate) node_name: String,
    /// The trust root: only certificates it signed are peers.
    pub(crate) ca_certificate: CertificateDer<'static>,
    /// The node's certificate, followed by any intermediates in its file.
    pub(crate) certificate_chain: Vec<CertificateDer<'static>>,
    /// The node's private key. Never printed.
    pub(crate) private_key: std::sync::Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for NodeCertificates {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeCertificates")
            .field("cluster_id", &self.cluster_id)
            .field("node_name", &self.node_name)
            .field("certificate_chain_length", &self.certificate_chain.len())
            .field("private_key", &"[elided]")
            .finish()
    }
}

impl NodeCertificates {
    /// Reads `ca.pem`, `<node_name>.pem` and `<node_name>.key` from `directory`.
    ///
    /// The CA key is not needed (and should not be on a node that only runs). Validity and the
    /// chain are checked by the peers during each handshake, not here.
    pub fn load(directory: &Path, node_name: &str) -> Result<NodeCertificates, LoadCertificatesError> {
        validate_node_name(node_name)
            .map_err(|problem| LoadCertificatesError::InvalidNodeName { name: node_name.to_owned(), problem })?;
        let files = node_files(directory, node_name);
        let ca_path = directory.join(CA_CERTIFICATE_FILE);
        let read = |path: &Path| {
            fs::read(path).map_err(|source| LoadCertificatesError::Read { path: path.to_owned(), source })
        };
        let invalid =
            |path: &Path, problem: String| LoadCertificatesError::InvalidPem { path: path.to_owned(), problem };

        let ca_pem = read(&ca_path)?;
        let ca_certificate =
            CertificateDer::from_pem_slice(&ca_pem).map_err(|error| invalid(&ca_path, error.to_string()))?;
        let cluster_id = cluster_id_of(&ca_certificate)
            .map_err(|problem| LoadCertificatesError::NoClusterId { path: ca_path.clone(), problem })?;

        let certificate_pem = read(&files.certificate_path)?;
        let certificate_chain = CertificateDer::pem_slice_iter(&certificate_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| invalid(&files.certificate_path, error.to_string()))?;
        if certificate_chain.is_empty() {
            return Err(invalid(&files.certificate_path, "no certificate".to_owned()));
        }
        let key_pem = read(&files.key_path)?;
        let private_key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| invalid(&files.key_path, error.to_string()))?;

        Ok(NodeCertificates {
            cluster_id,
            node_name: node_name.to_owned(),
            ca_certificate,
            certificate_chain,
            private_key: std::sync::Arc::new(private_key),
        })
    }

    /// The cluster id the CA names. The node may compare it with its configured cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The node name the files were loaded for.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

/// Checks a cluster id: 1 to [`CLUSTER_ID_BYTES_MAX`] ASCII letters, digits, `-`, `_`, `.`.
pub fn validate_cluster_id(cluster_id: &str) -> Result<(), &'static str> {
    validate_token(cluster_id, CLUSTER_ID_BYTES_MAX)
}

/// Checks a node name: 1 to [`NODE_NAME_BYTES_MAX`] ASCII letters, digits, `-`, `_`, `.`,
/// starting with a letter or digit, and not `ca` (which would collide with the CA's files).
pub fn validate_node_name(name: &str) -> Result<(), &'static str> {
    validate_token(name, NODE_NAME_BYTES_MAX)?;
    if name.eq_ignore_ascii_case("ca") {
        return Err("the name `ca` is taken by the cluster CA's files");
    }
    Ok(())
}

fn validate_token(token: &str, bytes_max: usize) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("it is empty");
    }
    if token.len() > bytes_max {
        return Err("it is too long");
    }
    if !token.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.')) {
        return Err("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    if !token.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("it must start with a letter or a digit");
    }
    Ok(())
}

fn node_files(directory: &Path, name: &str) -> WrittenFiles {
    WrittenFiles {
        certificate_path: directory.join(format!("{name}.pem")),
        key_path: directory.join(format!("{name}.key")),
    }
}

fn subject(common_name: &str, cluster_id: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "concord");
    name.push(DnType::OrganizationalUnitName, cluster_id);
    name
}

fn subject_alt_names(
    name: &str,
    ip_addresses: &[IpAddr],
    dns_names: &[String],
) -> Result<Vec<SanType>, IssueNodeCertificateError> {
    let dns = |dns_name: &str| {
        dns_name
            .to_owned()
            .try_into()
            .map(SanType::DnsName)
            .map_err(|_| IssueNodeCertificateError::InvalidDnsName(dns_name.to_owned()))
    };
    let mut names = vec![dns(name)?];
    names.extend(ip_addresses.iter().map(|address| SanType::IpAddress(*address)));
    for dns_name in dns_names {
        names.push(dns(dns_name)?);
    }
    Ok(names)
}

/// A positive 16-byte serial number. Falls back to the clock if the system has no randomness,
/// which only costs uniqueness across CAs, not security.
fn random_serial_number() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes = nanos.to_be_bytes();
    }
    // A leading zero bit keeps the DER integer positive; a set second bit keeps it 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The cluster id in a CA certificate's organizational unit.
pub(crate) fn cluster_id_of(certificate: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).map_err(|error| error.to_string())?;
    let unit = parsed.subject().iter_organizational_unit().next().ok_or("no organizational unit in the subject")?;
    let cluster_id = unit.as_str().map_err(|error| error.to_string())?;
    validate_cluster_id(cluster_id)
        .map_err(|problem| format!("the organizational unit is not a cluster id: {problem}"))?;
    Ok(cluster_id.to_owned())
}

/// Writes the key first (created with mode 0600, never over an existing file), then the
/// certificate. If the certificate cannot be written, the key is removed again.
fn write_pair(files: &WrittenFiles, certificate_pem: &str, key_pem: &str) -> Result<(), (PathBuf, io::Error)> {
    write_new(&files.key_path, key_pem.as_bytes(), 0o600).map_err(|error| (files.key_path.clone(), error))?;
    if let Err(error) = write_new(&files.certificate_path, certificate_pem.as_bytes(), 0o644) {
        let _ = fs::remove_file(&files.key_path);
        return Err((files.certificate_path.clone(), error));
    }
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
