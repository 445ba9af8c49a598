//! Certificates: a CA and the certificates of the controller, members and administrators
//! (rcgen on aws-lc-rs), in memory or written by `keycast init`.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use zeroize::Zeroizing;

pub use rcgen::Error as RcgenError;

/// PEM texts of one party: the CA certificate, its own certificate and private key.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl core::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Credentials(private key redacted)")
    }
}

/// A certificate authority that issues the group's certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert: Certificate,
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Authority {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority { issuer: Issuer::new(params, key), cert })
    }

    pub fn ca_pem(&self) -> String {
        self.cert.pem()
    }

    /// A client certificate that names `common_name` in its subject only, with no subject
    /// alternative name, as older tools issue them (the controller ignores the CN unless its
    /// config enables `identity_from_common_name`).
    pub fn issue_common_name_only(&self, common_name: &str) -> Result<Credentials, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credentials { ca_pem: self.ca_pem(), cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// A distributed flat participant's certificate: an Ed25519 key from `seed` (the key its
    /// announcements are signed with, see [`participant_signing_seed`]), its identity as a DNS
    /// name, valid for client and server authentication (participants connect to each other).
    pub fn issue_participant(&self, identity: &str, seed: &[u8; 32]) -> Result<Credentials, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(identity);
        params.subject_alt_names = vec![SanType::DnsName(identity.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        let der = Zeroizing::new([&ED25519_PKCS8_V1_PREFIX[..], seed].concat());
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&der[..].into(), &rcgen::PKCS_ED25519)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credentials { ca_pem: self.ca_pem(), cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// A controller's certificate valid for `server_name` alone (a DNS name): members must
    /// connect under that name, as to a controller on another host.
    pub fn issue_controller_named(&self, common_name: &str, server_name: &str) -> Result<Credentials, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = vec![SanType::DnsName(server_name.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credentials { ca_pem: self.ca_pem(), cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// A certificate for `common_name`: the controller's (`server`: valid for localhost and
    /// 127.0.0.1) or a client's (member or administrator; the name is its identity).
    pub fn issue(&self, common_name: &str, server: bool) -> Result<Credentials, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        if server {
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into()?),
                SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            ];
            // A TLS client too: a controller reaches its merge peer with this certificate.
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        } else {
            params.subject_alt_names = vec![SanType::DnsName(common_name.try_into()?)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credentials { ca_pem: self.ca_pem(), cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }
}

/// PKCS#8 v1 (RFC 8410) of an Ed25519 key, before its 32-byte seed.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The Ed25519 seed of a participant's private key (PKCS#8 v1, as `issue_participant` writes).
pub fn participant_signing_seed(credentials: &Credentials) -> Result<Zeroizing<[u8; 32]>, String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(credentials.key_pem.as_bytes()).map_err(|e| format!("no PKCS#8 key: {e}"))?;
    let der = der.secret_pkcs8_der();
    let seed = der.strip_prefix(&ED25519_PKCS8_V1_PREFIX[..]).filter(|s| s.len() == 32).ok_or("the key is not a PKCS#8 v1 Ed25519 key")?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(seed);
    Ok(out)
}

/// The Ed25519 public key a participant certificate (PEM) carries.
pub fn participant_public_key(cert_pem: &str) -> Result<[u8; 32], String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| format!("no certificate: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| format!("unparsable certificate: {e}"))?;
    let spki = &parsed.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err("the certificate's key is not Ed25519".into());
    }
    spki.subject_public_key.data.as_ref().try_into().map_err(|_| "an Ed25519 public key is 32 bytes".into())
}

/// The SHA-256 fingerprint of a DER certificate: what `admins` in server.toml lists.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

const FINGERPRINT_PREFIX: &str = "sha256:";

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Fingerprint {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        Fingerprint(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// The fingerprint of the first certificate of a PEM text.
    pub fn of_pem(pem: &str) -> Result<Fingerprint, String> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("no certificate in the PEM text: {e}"))?;
        Ok(Fingerprint::of_der(der.as_ref()))
    }

    /// Parses "sha256:<64 hex digits>" (the only form accepted).
    pub fn parse(text: &str) -> Result<Fingerprint, String> {
        let hex_digits = text.strip_prefix(FINGERPRINT_PREFIX).ok_or_else(|| {
            format!("{text:?} is not a certificate fingerprint: expected \"sha256:\" and 64 hex digits (`keycast init` writes the admin's)")
        })?;
        let bytes = hex::decode(hex_digits).map_err(|e| format!("{text:?}: bad hex ({e})"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| format!("{text:?}: a SHA-256 fingerprint has 64 hex digits"))?;
        Ok(Fingerprint(bytes))
    }

    /// Compares in constant time (no early exit on the first differing byte).
    pub fn matches(&self, other: &Fingerprint) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl core::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{FINGERPRINT_PREFIX}{}", hex::encode(self.0))
    }
}

impl core::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl Credentials {
    /// The fingerprint of this party's certificate.
    pub fn fingerprint(&self) -> Result<Fingerprint, String> {
        Fingerprint::of_pem(&self.cert_pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_read_back_only_in_its_own_form() {
        let admin = Authority::new("test CA").unwrap().issue("admin", false).unwrap();
        let fingerprint = admin.fingerprint().unwrap();
        assert_eq!(Fingerprint::parse(&fingerprint.to_string()), Ok(fingerprint));
        let hex_only = fingerprint.to_string().replace("sha256:", "");
        for bad in ["admin", hex_only.as_str(), "sha256:00", "sha1:0000000000000000000000000000000000000000", "sha256:zz"] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad} was taken for a fingerprint");
        }
        let other = Authority::new("test CA").unwrap().issue("admin", false).unwrap().fingerprint().unwrap();
        assert!(fingerprint.matches(&fingerprint) && !fingerprint.matches(&other));
    }

    #[test]
    fn a_participant_certificate_carries_the_key_of_its_seed() {
        let authority = Authority::new("test CA").unwrap();
        let participant = authority.issue_participant("participant-1", &[7; 32]).unwrap();
        assert_eq!(*participant_signing_seed(&participant).unwrap(), [7; 32]);
        let signer = keycast_core::wire::Signer::from_seed(&[7; 32]);
        assert_eq!(participant_public_key(&participant.cert_pem).unwrap(), signer.verifying_key().0);
        let member = authority.issue("member-1", false).unwrap();
        assert!(participant_signing_seed(&member).is_err() && participant_public_key(&member.cert_pem).is_err());
    }
}
