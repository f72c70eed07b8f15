//! TLS for PostgreSQL and Redis, with libpq's modes.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Error, Result};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS always, certificate not verified.
    Require,
    /// TLS with the chain verified against the CA, host name not checked.
    VerifyCa,
    /// TLS with chain and host name verified.
    VerifyFull,
}

impl TlsMode {
    pub fn parse(text: &str) -> Result<TlsMode> {
        Ok(match text {
            "disable" => TlsMode::Disable,
            "prefer" | "allow" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(Error::invalid_argument(format!(
                    "tls.mode must be one of disable, prefer, require, verify-ca, verify-full (got {other:?})"
                )))
            }
        })
    }
}

/// TLS settings: mode plus an optional PEM CA bundle (else the Mozilla roots).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsOptions {
    pub mode: TlsMode,
    pub ca_pem: Option<String>,
}

impl TlsOptions {
    pub fn client_config(&self) -> Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(self.roots()?);
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::internal(format!("TLS setup failed: {e}")))?;
        let config = match self.mode {
            TlsMode::VerifyFull => builder.with_root_certificates(roots).with_no_client_auth(),
            TlsMode::VerifyCa | TlsMode::Prefer | TlsMode::Require | TlsMode::Disable => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|e| {
                            Error::invalid_argument(format!("tls.ca cannot be used: {e}"))
                        })?;
                let verifier = Relaxed {
                    inner: webpki,
                    check_chain: self.mode == TlsMode::VerifyCa,
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            }
        };
        Ok(config)
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.ca_pem {
            Some(pem) => {
                let mut reader = std::io::BufReader::new(pem.as_bytes());
                let mut added = 0;
                for cert in rustls_pemfile::certs(&mut reader) {
                    let cert = cert.map_err(|e| {
                        Error::invalid_argument(format!("tls.ca is not valid PEM: {e}"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        Error::invalid_argument(format!(
                            "tls.ca holds an unusable certificate: {e}"
                        ))
                    })?;
                    added += 1;
                }
                if added == 0 {
                    return Err(Error::invalid_argument("tls.ca holds no PEM certificate"));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

/// `require`/`prefer`: accept any certificate (encryption only). `verify-ca`: verify the chain,
/// ignore the host name.
#[derive(Debug)]
struct Relaxed {
    inner: Arc<WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
