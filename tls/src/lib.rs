//! Who may talk to a decree process, and what they may do.
//!
//! - [`Tls`]: this process's certificate, key and trusted CA (and, given one,
//!   the CA's revocation list), loaded with rustls and reloaded on SIGHUP or
//!   when the files change; connections already open keep the session they
//!   have, new ones get the new material.
//! - [`incoming`] and [`channel`]: every connection a server accepts and every
//!   connection a process opens is mutual TLS once [`install`]ed, plaintext
//!   otherwise. A server learns each peer's identity at the handshake
//!   ([`Peer`]): the first DNS name among its certificate's subject
//!   alternative names.
//! - [`policy`]: which roles each identity has, and the role each RPC needs,
//!   checked for every request by the [`policy::Authorize`] layer.
//! - [`certs`] (feature `certs`): a development CA and certificates for a
//!   local cluster, as `decree certs` writes them.
//!
//! One process has one identity: [`install`] sets it for every channel the
//! process opens (the SDK's included) and every server it runs.

#[cfg(feature = "certs")]
pub mod certs;
pub mod policy;
mod transport;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

pub use transport::{channel, connect, incoming, Conn, Peer};

/// TLS handshakes a server refused (no certificate, one the CA did not sign, expired, ...).
pub const HANDSHAKES_REFUSED: &str = "decree_tls_handshakes_refused_total";
/// Reloads of the TLS material or the policy, by `what` and `result` (`ok`, `error`).
pub const RELOADS: &str = "decree_tls_reloads_total";
/// When this process's certificate expires (Unix seconds).
pub const CERT_EXPIRES: &str = "decree_tls_certificate_expiry_seconds";

/// The flags (and environment variables, and `--config` keys) that give a
/// process its TLS material: all three, or none for plaintext.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize)]
pub struct TlsArgs {
    /// This process's certificate chain (PEM). Its first DNS name is the process's identity. With
    /// --tls-key and --tls-ca every connection in and out is mutual TLS; reloaded on SIGHUP or change.
    #[arg(long, global = true, env = "DECREE_TLS_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "DECREE_TLS_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) a peer's certificate must chain to, in both directions.
    #[arg(long, global = true, env = "DECREE_TLS_CA", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Revocation lists (PEM CRLs) of the --tls-ca: a peer whose certificate one lists is refused at
    /// the handshake, in both directions. Reloaded on SIGHUP or change (`decree certs --revoke`).
    #[arg(long, global = true, env = "DECREE_TLS_CRL", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_crl: Option<PathBuf>,
}

impl TlsArgs {
    /// The three files (and the revocation list, if given), `None` for
    /// plaintext; some but not all three is refused, and so is a list without them.
    pub fn files(&self) -> Result<Option<TlsFiles>, String> {
        let crl = self.tls_crl.clone();
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) if crl.is_some() => {
                Err("--tls-crl needs --tls-cert, --tls-key and --tls-ca: it revokes certificates of that CA"
                    .into())
            }
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone(), crl }))
            }
            _ => Err("--tls-cert, --tls-key and --tls-ca go together: give all three, or none for plaintext"
                .into()),
        }
    }

    /// For a short-lived command (the CLI): loads the material and installs
    /// it for every channel this process opens. Nothing to do without files.
    pub fn install(&self) -> Result<(), String> {
        match self.files()? {
            None => Ok(()),
            Some(files) => install(Tls::load(files).map_err(|e| e.to_string())?),
        }
    }
}

/// Where a process's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The CA's revocation lists, if any.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone(), self.ca.clone()];
        paths.extend(self.crl.clone());
        paths
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("the key {} does not go with the certificate {}: {what}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf, what: String },
    #[error("{}: {what}", crl.display())]
    Revocation { crl: PathBuf, what: String },
}

/// The material in use: rustls configurations for both directions, and what
/// the process's own certificate says.
struct Material {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    identity: Option<String>,
    expires: Option<i64>,
    /// Certificates the revocation lists name, if lists were given.
    revoked: Option<usize>,
    /// The lists revoke this process's own certificate.
    own_revoked: bool,
}

const OWN_REVOKED: &str = "it revokes this process's own certificate";

/// A process's TLS material, reloadable.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).field("identity", &self.identity()).finish()
    }
}

impl Tls {
    /// Reads and checks the three files: a certificate, a key that goes with
    /// it, and at least one CA certificate.
    /// A revocation list that revokes this process's own certificate is
    /// refused here: the process would be refused by every peer that has it.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let material = load(&files)?;
        if let Some(crl) = files.crl.as_ref().filter(|_| material.own_revoked) {
            return Err(TlsError::Revocation { crl: crl.clone(), what: OWN_REVOKED.into() });
        }
        Ok(Arc::new(Tls { files, current: RwLock::new(Arc::new(material)) }))
    }

    /// Reads the files again; on any error the material in use stays. A
    /// list that now revokes this process's own certificate is taken all
    /// the same (what else it revokes must not be let in any longer), and
    /// said at ERROR: the process's peers refuse it from now on.
    pub fn reload(&self) -> Result<String, TlsError> {
        let material = Arc::new(load(&self.files)?);
        let mut described = describe(&material);
        if material.own_revoked {
            tracing::error!(crl = ?self.files.crl, "the revocation list reloaded revokes this process's own certificate: peers refuse it");
            described.push_str(&format!("; {OWN_REVOKED}"));
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = material;
        Ok(described)
    }

    /// This process's identity: the first DNS name of its certificate.
    pub fn identity(&self) -> Option<String> {
        self.material().identity.clone()
    }

    /// The files, as given.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn material(&self) -> Arc<Material> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.material().server.clone()
    }

    pub(crate) fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.material().client.clone()
    }

    /// Reloads on SIGHUP and whenever one of the files changes (checked every
    /// second), for as long as the process runs; a reload that fails is
    /// logged and the material in use stays.
    pub fn watch(self: &Arc<Self>) {
        let tls = self.clone();
        watch::spawn("tls", self.files.paths(), move || {
            let described = tls.reload().map_err(|e| e.to_string())?;
            record_expiry(&tls.material());
            Ok(described)
        });
    }
}

fn describe(material: &Material) -> String {
    let identity = material.identity.as_deref().unwrap_or("(no DNS name: no identity)");
    let mut text = match material.expires {
        Some(expires) => format!("identity {identity}, certificate valid until {}", unix_to_text(expires)),
        None => format!("identity {identity}"),
    };
    if let Some(revoked) = material.revoked {
        text.push_str(&format!(", {revoked} certificate(s) revoked"));
    }
    text
}

fn record_expiry(material: &Material) {
    if let Some(expires) = material.expires {
        metrics::gauge!(CERT_EXPIRES).set(expires as f64);
    }
}

fn unix_to_text(seconds: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(seconds)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{seconds} (Unix seconds)"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |what: String| TlsError::Invalid { path: path.to_owned(), what };
    pem_objects(path, "certificates", "CERTIFICATE", invalid)
}

/// The PEM blocks of one kind in `path`, at least one (`kind` and the
/// block's `label` name them in an error).
fn pem_objects<T: PemObject>(
    path: &Path,
    kind: &str,
    label: &str,
    invalid: impl Fn(String) -> TlsError,
) -> Result<Vec<T>, TlsError> {
    let objects = T::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM {kind}: {e}")))?;
    if objects.is_empty() {
        return Err(invalid(format!("holds no {kind} (expected -----BEGIN {label}-----)")));
    }
    Ok(objects)
}

fn load(files: &TlsFiles) -> Result<Material, TlsError> {
    let chain = certificates(&files.cert)?;
    let key_text = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| TlsError::Invalid {
        path: files.key.clone(),
        what: format!("no private key in it ({e})"),
    })?;
    let roots = roots(&files.ca)?;
    let rustls_error = |path: &Path| {
        let path = path.to_owned();
        move |e: rustls::Error| TlsError::Invalid { path, what: e.to_string() }
    };
    let mismatch = |e: rustls::Error| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        what: e.to_string(),
    };
    let crls = match &files.crl {
        Some(path) => revocation_lists(path)?,
        None => Vec::new(),
    };
    let revoked = files.crl.as_ref().map(|_| revoked_count(&crls));
    let verifier_error = |e: rustls::server::VerifierBuilderError| match &files.crl {
        Some(crl) => TlsError::Revocation { crl: crl.clone(), what: e.to_string() },
        None => TlsError::Invalid { path: files.ca.clone(), what: e.to_string() },
    };
    // Only a peer's own certificate is looked up in the lists (a chain's
    // intermediates are not): its status must be known, so lists of
    // another CA refuse every peer, which the check below finds first.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.clone())
        .only_check_end_entity_revocation()
        .build()
        .map_err(verifier_error)?;
    let own_revoked = match &files.crl {
        Some(crl) => check_own(&verifier, &roots, &chain, crl)?,
        None => false,
    };
    let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()
        .map_err(verifier_error)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error(&files.cert))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error(&files.cert))?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain.clone(), key)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    let parsed = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| TlsError::Invalid {
        path: files.cert.clone(),
        what: format!("cannot read the certificate: {e}"),
    })?;
    let expires = Some(parsed.1.validity().not_after.timestamp());
    Ok(Material {
        server: Arc::new(server),
        client: Arc::new(client),
        identity: identity_of(&chain[0]),
        expires,
        revoked,
        own_revoked,
    })
}

/// The trusted CA certificates in `ca` (PEM).
fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Invalid { path: ca.to_owned(), what: format!("not a CA: {e}") })?;
    }
    Ok(Arc::new(roots))
}

/// A verifier of client certificates against `roots` alone, no revocation
/// lists (an error names `path`, the file that made it fail).
fn plain_verifier(
    roots: &Arc<rustls::RootCertStore>,
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Invalid { path: path.to_owned(), what: e.to_string() })
}

/// The revocation lists in `path` (PEM `X509 CRL` blocks, at least one).
fn revocation_lists(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let invalid = |what: String| TlsError::Revocation { crl: path.to_owned(), what };
    pem_objects(path, "revocation lists", "X509 CRL", invalid)
}

/// How many certificates `crls` revoke.
fn revoked_count(crls: &[CertificateRevocationListDer<'_>]) -> usize {
    crls.iter()
        .filter_map(|crl| x509_parser::parse_x509_crl(crl).ok())
        .map(|(_, crl)| crl.iter_revoked_certificates().count())
        .sum()
}

/// This process's own certificate, checked as a peer would check it, with
/// the lists and without: lists that fail it only because they cannot
/// speak for its CA (so that every peer would be refused) are refused here,
/// with a clear error, before any peer is turned away. Whether they revoke
/// it is the answer.
fn check_own(
    with_lists: &Arc<dyn rustls::server::danger::ClientCertVerifier>,
    roots: &Arc<rustls::RootCertStore>,
    chain: &[CertificateDer<'static>],
    crl: &Path,
) -> Result<bool, TlsError> {
    let now = UnixTime::now();
    let Err(err) = with_lists.verify_client_cert(&chain[0], &chain[1..], now) else { return Ok(false) };
    if plain_verifier(roots, crl).is_ok_and(|v| v.verify_client_cert(&chain[0], &chain[1..], now).is_err()) {
        // Not the lists' business (expired, say): the handshake says so to the peer.
        return Ok(false);
    }
    let what = match err {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => return Ok(true),
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownRevocationStatus) => {
            "no list in it is signed by the CA that issued this process's certificate (--tls-ca): \
             every peer would be refused"
                .to_owned()
        }
        other => {
            format!("every peer would be refused: this process's own certificate fails with it ({other})")
        }
    };
    Err(TlsError::Revocation { crl: crl.to_owned(), what })
}

/// Whether the CA certificates in `ca` (PEM) signed `cert` (DER): its
/// chain verifies to them, whatever else may be wrong with it (expired, say).
#[cfg(feature = "certs")]
pub(crate) fn signed_by(ca: &Path, cert: &[u8]) -> Result<bool, TlsError> {
    let verifier = plain_verifier(&roots(ca)?, ca)?;
    let cert = CertificateDer::from(cert.to_vec());
    Ok(!matches!(
        verifier.verify_client_cert(&cert, &[], UnixTime::now()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadSignature | rustls::CertificateError::UnknownIssuer
        ))
    ))
}

/// A certificate's identity: the first DNS name among its subject
/// alternative names (`None` without one: such a peer has no roles).
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    names.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
        _ => None,
    })
}

static INSTALLED: OnceLock<Arc<Tls>> = OnceLock::new();

/// Makes `tls` the material of every server and channel of this process.
/// Once per process: a second, different installation is refused.
pub fn install(tls: Arc<Tls>) -> Result<(), String> {
    let files = tls.files.clone();
    let installed = INSTALLED.get_or_init(|| tls);
    if installed.files != files {
        return Err("this process already has its TLS material; one identity per process".into());
    }
    Ok(())
}

/// The material installed, if any (`None`: plaintext).
pub fn installed() -> Option<&'static Arc<Tls>> {
    INSTALLED.get()
}

/// For a server process: installs the material `args` name (and watches it),
/// loads the policy `policy` names (and watches it), and says at start how
/// the process can be reached. A policy needs TLS: identities come from
/// certificates.
pub fn setup_server(what: &str, args: &TlsArgs, policy: Option<&Path>) -> Result<(), String> {
    let files = args.files()?;
    if policy.is_some() && files.is_none() {
        return Err(
            "--policy needs --tls-cert, --tls-key and --tls-ca: identities come from certificates".into()
        );
    }
    let Some(files) = files else {
        tracing::warn!(
            "{what} serves plaintext: anyone who can reach its port can do anything \
             (give --tls-cert, --tls-key and --tls-ca for mutual TLS, and --policy for roles)"
        );
        return Ok(());
    };
    let tls = Tls::load(files).map_err(|e| e.to_string())?;
    install(tls.clone())?;
    record_expiry(&tls.material());
    tls.watch();
    match policy {
        Some(path) => {
            policy::install(path)?;
            tracing::info!(policy = %path.display(), "{what} speaks mutual TLS as {}", describe(&tls.material()));
        }
        None => tracing::warn!(
            "{what} speaks mutual TLS as {}; without --policy every peer the CA vouches for has every role",
            describe(&tls.material())
        ),
    }
    Ok(())
}
