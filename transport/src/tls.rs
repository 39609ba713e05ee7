//! TLS 1.3 configurations with mutual authentication against the cluster CA, on rustls with the
//! ring provider.
//!
//! Not the certificate files (see [`crate::certificates`]) and not QUIC (see [`crate::Endpoint`]).
//!
//! # The server-name scheme
//!
//! A dialer knows an address, not the name of the node behind it, so it cannot ask for a name.
//! Both directions therefore check the same thing: the peer's certificate chains to the cluster
//! CA, is within its validity period, and carries the right extended key usage (server
//! authentication for the listener, client authentication for the dialer). The server name the
//! dialer sends, [`SERVER_NAME`], is a fixed placeholder that nobody checks, and the subject
//! alternative names of a peer's certificate are accepted whatever they are. Membership is
//! "signed by the cluster CA"; the node name a peer reports in the application handshake is
//! informational.
//!
//! Session resumption is off on both sides, so every connection presents and verifies
//! certificates afresh (an expired certificate is refused even if the peer connected before),
//! and early data (0-RTT) is never accepted.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::certificates::NodeCertificates;

/// The one ALPN protocol both sides offer. A peer that offers another is refused during TLS.
pub const ALPN: &[u8] = b"concord/1";

/// The server name a dialer sends. A placeholder: see the module doc.
pub const SERVER_NAME: &str = "concord";

/// Why a rustls configuration could not be built from loaded certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The CA certificate cannot be a trust anchor.
    #[error("the CA certificate cannot be a trust root: {0}")]
    InvalidCa(rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("cannot verify clients against the CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// The node's certificate and key do not form a usable pair.
    #[error("the node certificate or key is unusable: {0}")]
    Certificate(rustls::Error),
}

/// The ring provider. The transport always builds its configurations with it explicitly, so it
/// does not depend on the process default; see [`crate::install_crypto_provider`] for the rest
/// of the process.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeCertificates {
    /// A TLS 1.3 server configuration that presents this node's certificate and requires a
    /// client certificate signed by the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsConfigError> {
        let provider = provider();
        let roots = Arc::new(self.root_store()?);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsConfigError::Certificate)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(self.certificate_chain.clone(), self.private_key.clone_key())
            .map_err(TlsConfigError::Certificate)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.max_early_data_size = 0;
        Ok(config)
    }

    /// A TLS 1.3 client configuration that presents this node's certificate and accepts a
    /// server whose certificate the cluster CA signed, whatever its names (see the module doc).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsConfigError> {
        let provider = provider();
        let verifier =
            ClusterServerVerifier { roots: self.root_store()?, algorithms: provider.signature_verification_algorithms };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsConfigError::Certificate)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.certificate_chain.clone(), self.private_key.clone_key())
            .map_err(TlsConfigError::Certificate)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_early_data = false;
        Ok(config)
    }

    fn root_store(&self) -> Result<RootCertStore, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_certificate.clone()).map_err(TlsConfigError::InvalidCa)?;
        Ok(roots)
    }
}

/// Verifies a listener's certificate against the cluster CA without checking its names.
///
/// The chain, validity period and server-authentication key usage are checked exactly as
/// rustls's own `WebPkiServerVerifier` checks them (the same webpki call); only the name check
/// is left out, because the dialer does not know the name (see the module doc).
#[derive(Debug)]
struct ClusterServerVerifier {
    roots: RootCertStore,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configurations allow TLS 1.3 only, so this is never reached; refuse if it is.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration that trusts the cluster CA but presents no certificate: what a
/// stranger without a certificate would use. Tests only.
#[cfg(test)]
pub(crate) fn client_config_without_certificate(certificates: &NodeCertificates) -> rustls::ClientConfig {
    let provider = provider();
    let verifier = ClusterServerVerifier {
        roots: certificates.root_store().expect("CA root"),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config
}
