//! TLS 1.3 only, client certificates required, one crypto provider (aws-lc-rs); and the
//! framing of wire messages on a TLS stream (u32 length, then the message).

use std::sync::Arc;

use keycast_core::wire::MAX_MESSAGE_LEN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use rustls::pki_types::ServerName;
pub use tokio_rustls::TlsConnector;
pub use rustls::ClientConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::TlsFiles;
use crate::pki::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {0}: {1}")]
    Read(std::path::PathBuf, std::io::Error),
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

impl Credentials {
    pub fn load(files: &TlsFiles) -> Result<Credentials, TlsSetupError> {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| TlsSetupError::Read(p.into(), e));
        Ok(Credentials { ca_pem: read(&files.ca)?, cert_pem: read(&files.cert)?, key_pem: read(&files.key)?.into() })
    }

    fn parts(&self) -> Result<(RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
        let pem = |e: rustls::pki_types::pem::Error| TlsSetupError::Pem(e.to_string());
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(ca.map_err(pem)?)?;
        }
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(pem)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(pem)?;
        Ok((roots, certs, key))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn server_config(credentials: &Credentials) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let (roots, certs, key) = credentials.parts()?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

pub fn client_config(credentials: &Credentials) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let (roots, certs, key) = credentials.parts()?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Longest identity accepted from a certificate.
pub const MAX_IDENTITY_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    #[error("the client certificate names no identity: it has no URI or DNS subject alternative name{0}")]
    NoIdentity(&'static str),
    #[error("the identity is empty, longer than {MAX_IDENTITY_LEN} bytes or holds control characters")]
    BadIdentity,
}

/// The identity of a verified peer: its certificate's first URI subject alternative name,
/// else its first DNS one; the subject's common name only if `common_name_fallback` (a member
/// certificate's CN is whatever its requester asked for; SANs are what CAs vet).
pub fn peer_identity(cert_der: &[u8], common_name_fallback: bool) -> Result<String, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert_der).map_err(|_| IdentityError::Unparsable)?;
    let names = parsed.subject_alternative_name().map_err(|_| IdentityError::Unparsable)?;
    let names = names.map(|ext| ext.value.general_names.as_slice()).unwrap_or_default();
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let dns = names.iter().find_map(|n| match n {
        GeneralName::DNSName(dns) => Some(*dns),
        _ => None,
    });
    let identity = match uri.or(dns) {
        Some(name) => name.to_owned(),
        None if common_name_fallback => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(IdentityError::NoIdentity(" and no common name"))?
            .to_owned(),
        None => return Err(IdentityError::NoIdentity(" (the common name is used only with identity_from_common_name = true)")),
    };
    check_identity(&identity)?;
    Ok(identity)
}

/// An identity is 1 to 255 bytes without control characters (it appears in logs and tables).
pub fn check_identity(identity: &str) -> Result<(), IdentityError> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN || identity.chars().any(char::is_control) {
        return Err(IdentityError::BadIdentity);
    }
    Ok(())
}

/// The verified peer's first certificate.
pub fn peer_certificate(state: &rustls::CommonState) -> Result<&[u8], IdentityError> {
    state.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref()).ok_or(IdentityError::NoCertificate)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, message: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(message.len() as u32).to_be_bytes()).await?;
    stream.write_all(message).await?;
    stream.flush().await
}

/// One frame, refused before allocation if longer than any message.
pub async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes is too long")));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}
