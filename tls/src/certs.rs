//! A development CA and certificates for a local cluster (`decree certs`).
//!
//! Each certificate names its identity first among its DNS names, then
//! `localhost` and `127.0.0.1` (so a local URL verifies), and serves both as
//! a server's and a client's certificate. The CA is kept in the directory
//! and used again for names added later. A `policy.toml` beside them gives
//! each identity its role, and the CA's revocation list (`ca.crl`, for
//! `--tls-crl`) names the certificates [`revoke`]d.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;

use crate::policy::Role;

/// One certificate to make: its identity and the roles the policy gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub roles: Vec<Role>,
}

impl Identity {
    /// `NAME` or `NAME=ROLE[+ROLE...]`; without roles they follow from the
    /// name: `coordinator*`, `client*`, `operator*`, `observer*`, and any
    /// other name is a participant's.
    pub fn parse(text: &str) -> Result<Identity, String> {
        let (name, roles) = match text.split_once('=') {
            Some((name, roles)) => {
                (name, roles.split('+').map(str::parse).collect::<Result<Vec<Role>, String>>()?)
            }
            None => (text, vec![Identity::role_for(text)]),
        };
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !name.starts_with('-');
        if !valid {
            return Err(format!("{name:?}: an identity is a DNS label (letters, digits, '-'; at most 63)"));
        }
        Ok(Identity { name: name.to_owned(), roles })
    }

    fn role_for(name: &str) -> Role {
        [Role::Coordinator, Role::Client, Role::Operator, Role::Observer]
            .into_iter()
            .find(|role| name.starts_with(role.as_str()))
            .unwrap_or(Role::Participant)
    }
}

/// The identities of a local cluster: a coordinator, three participants, a
/// client, an operator and an observer.
pub fn default_identities() -> Vec<Identity> {
    ["coordinator", "p1", "p2", "p3", "client", "operator", "observer"]
        .into_iter()
        .map(|name| Identity::parse(name).expect("valid"))
        .collect()
}

/// Where the files of identity `name` are in `dir`.
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.crt"))
}

pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}

pub fn policy_path(dir: &Path) -> PathBuf {
    dir.join("policy.toml")
}

/// The CA's revocation list in `dir` (what `--tls-crl` takes).
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join("ca.crl")
}

/// The TLS files of identity `name` in `dir`.
pub fn files(dir: &Path, name: &str) -> crate::TlsFiles {
    crate::TlsFiles { cert: cert_path(dir, name), key: key_path(dir, name), ca: ca_path(dir), crl: None }
}

/// What [`make`] wrote.
#[derive(Debug)]
pub struct Made {
    pub ca_created: bool,
    pub written: Vec<PathBuf>,
}

/// Writes a certificate and key for each identity into `dir` (created if
/// need be), signed by the CA there (`ca.crt`, `ca.key`; made first if
/// absent), and adds the identities' roles to `policy.toml`. Keys are
/// written readable by their owner only.
pub fn make(dir: &Path, identities: &[Identity]) -> Result<Made, String> {
    make_valid_for(dir, identities, 365)
}

/// [`make`], the new certificates (and a new CA) valid for `days` from now.
pub fn make_valid_for(dir: &Path, identities: &[Identity], days: u32) -> Result<Made, String> {
    let now = time::OffsetDateTime::now_utc();
    let (not_before, not_after) = (now - time::Duration::hours(1), now + time::Duration::days(days.into()));
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    std::fs::create_dir_all(dir).map_err(|e| fail(&format!("cannot create {}", dir.display()), &e))?;
    let ca_key_path = dir.join("ca.key");
    let mut written = Vec::new();
    let ca_created = !ca_path(dir).exists();
    let ca_key = if ca_created {
        let key = KeyPair::generate().map_err(|e| fail("cannot make a key", &e))?;
        let mut params = CertificateParams::new(Vec::new()).map_err(|e| fail("CA", &e))?;
        params.distinguished_name.push(DnType::CommonName, "decree development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = (not_before, not_after + time::Duration::days(3650));
        let cert = params.self_signed(&key).map_err(|e| fail("cannot sign the CA", &e))?;
        write(&ca_path(dir), cert.pem().as_bytes(), false)?;
        write(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
        written.extend([ca_path(dir), ca_key_path.clone()]);
        // An empty revocation list from the start: `--tls-crl` can name it before anything is revoked.
        let issuer = Issuer::from_ca_cert_pem(&cert.pem(), &key).map_err(|e| fail("CA", &e))?;
        write_crl(dir, &issuer, Vec::new(), 1, days)?;
        written.push(crl_path(dir));
        key
    } else {
        let text = read(&ca_key_path)?;
        KeyPair::from_pem(&text).map_err(|e| fail(&format!("{}", ca_key_path.display()), &e))?
    };
    let ca_text = read(&ca_path(dir))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_text, ca_key)
        .map_err(|e| fail(&format!("{}", ca_path(dir).display()), &e))?;
    for identity in identities {
        let key = KeyPair::generate().map_err(|e| fail("cannot make a key", &e))?;
        let names = vec![identity.name.clone(), "localhost".into(), "127.0.0.1".into()];
        let mut params = CertificateParams::new(names).map_err(|e| fail(&identity.name, &e))?;
        params.distinguished_name.push(DnType::CommonName, identity.name.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        (params.not_before, params.not_after) = (not_before, not_after);
        let cert = params.signed_by(&key, &issuer).map_err(|e| fail(&identity.name, &e))?;
        write(&cert_path(dir, &identity.name), cert.pem().as_bytes(), false)?;
        write(&key_path(dir, &identity.name), key.serialize_pem().as_bytes(), true)?;
        written.extend([cert_path(dir, &identity.name), key_path(dir, &identity.name)]);
    }
    write_policy(&policy_path(dir), identities)?;
    written.push(policy_path(dir));
    Ok(Made { ca_created, written })
}

/// What [`revoke`] wrote.
#[derive(Debug)]
pub struct Revoked {
    /// The names whose certificates it added to the list.
    pub added: Vec<String>,
    /// Certificates the list names now (those revoked before too).
    pub listed: usize,
}

/// Revokes the certificates of `names` in `dir` (`NAME.crt`): writes the
/// CA's revocation list (`ca.crl`) again, signed by the CA there, naming
/// them beside every certificate it named before, under the next list
/// number. Its next-update date is `days` away; a process does not hold
/// the list to it (the list stays in force until it is replaced). A name
/// whose certificate this CA did not sign is refused, and nothing is written.
pub fn revoke(dir: &Path, names: &[String], days: u32) -> Result<Revoked, String> {
    let ca_text = read(&ca_path(dir))?;
    let ca_key_path = dir.join("ca.key");
    let ca_key =
        KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_text, ca_key).map_err(|e| format!("{}: {e}", ca_path(dir).display()))?;
    let (mut revoked, number) = listed(&crl_path(dir))?;
    let now = time::OffsetDateTime::now_utc();
    let mut added = Vec::new();
    for name in names {
        let path = cert_path(dir, name);
        let (_, pem) = x509_parser::pem::parse_x509_pem(read(&path)?.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let cert = pem.parse_x509().map_err(|e| format!("{}: {e}", path.display()))?;
        if !crate::signed_by(&ca_path(dir), &pem.contents).map_err(|e| e.to_string())? {
            return Err(format!("{}: not signed by the CA in {}", path.display(), ca_path(dir).display()));
        }
        let serial = cert.raw_serial().to_vec();
        if !revoked.iter().any(|(listed, _)| *listed == serial) {
            revoked.push((serial, now));
            added.push(name.clone());
        }
    }
    let listed = revoked.len();
    write_crl(dir, &issuer, revoked, number + 1, days)?;
    Ok(Revoked { added, listed })
}

/// A revoked certificate's serial number and when it was revoked.
type Entry = (Vec<u8>, time::OffsetDateTime);

/// The serials (and revocation times) the list at `path` names, and its
/// number; none and 0 if there is no list yet.
fn listed(path: &Path) -> Result<(Vec<Entry>, u64), String> {
    if !path.exists() {
        return Ok((Vec::new(), 0));
    }
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let der = rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&text)
        .map_err(|e| format!("{}: not a PEM revocation list: {e}", path.display()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| format!("{}: {e}", path.display()))?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.revocation_date.to_datetime()))
        .collect();
    let number = crl.crl_number().and_then(|n| n.to_u64_digits().first().copied()).unwrap_or(0);
    Ok((revoked, number))
}

fn write_crl(
    dir: &Path,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    revoked: Vec<Entry>,
    number: u64,
    days: u32,
) -> Result<(), String> {
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(days.max(1).into()),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .into_iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer).map_err(|e| format!("cannot sign the revocation list: {e}"))?;
    let pem = crl.pem().map_err(|e| format!("cannot write the revocation list: {e}"))?;
    write(&crl_path(dir), pem.as_bytes(), false)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Writes through a temporary file and a rename, so that a process watching
/// `path` never reads it half written.
fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), String> {
    use std::io::Write;
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&temporary).map_err(fail)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(fail)?;
    std::fs::rename(&temporary, path).map_err(fail)
}

/// Adds `identities` to the policy file at `path`, keeping the identities
/// already there (an identity made again gets the roles given now).
fn write_policy(path: &Path, identities: &[Identity]) -> Result<(), String> {
    let mut roles: BTreeMap<String, Vec<Role>> = BTreeMap::new();
    if path.exists() {
        #[derive(serde::Deserialize)]
        struct File {
            identities: BTreeMap<String, Vec<Role>>,
        }
        let file: File = toml::from_str(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?;
        roles = file.identities;
    }
    for identity in identities {
        roles.insert(identity.name.clone(), identity.roles.clone());
    }
    let mut text = String::from(
        "# Who may do what: each identity (the first DNS name of its certificate) and its roles.\n\
         # Roles: participant, coordinator, client, operator, observer. \"*\" = [...] gives roles to every\n\
         # peer the CA vouches for. Reloaded on SIGHUP or when this file changes.\n[identities]\n",
    );
    for (name, roles) in &roles {
        let roles: Vec<String> = roles.iter().map(|role| format!("{:?}", role.as_str())).collect();
        let key = if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            name.clone()
        } else {
            format!("{name:?}")
        };
        text.push_str(&format!("{key} = [{}]\n", roles.join(", ")));
    }
    write(path, text.as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_take_their_role_from_the_name_unless_given() {
        assert_eq!(Identity::parse("p1").unwrap().roles, vec![Role::Participant]);
        assert_eq!(Identity::parse("coordinator-2").unwrap().roles, vec![Role::Coordinator]);
        assert_eq!(Identity::parse("operator").unwrap().roles, vec![Role::Operator]);
        assert_eq!(Identity::parse("ci=client+observer").unwrap().roles, vec![Role::Client, Role::Observer]);
        assert!(Identity::parse("x=admin").unwrap_err().contains("unknown role"));
        assert!(Identity::parse("a b").unwrap_err().contains("DNS label"));
        assert!(Identity::parse("").is_err());
    }

    /// Runs a TLS handshake in memory between `client` and `server`.
    fn handshake(client: &crate::Tls, server: &crate::Tls) -> Result<(), String> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c: rustls::Connection =
            rustls::ClientConnection::new(client.client_config(), name).map_err(|e| e.to_string())?.into();
        let mut s: rustls::Connection =
            rustls::ServerConnection::new(server.server_config()).map_err(|e| e.to_string())?.into();
        for _ in 0..10 {
            send(&mut c, &mut s, "server")?;
            send(&mut s, &mut c, "client")?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("the handshake did not end".into())
    }

    /// What `from` has to send, read and processed by `to` (the `receiver`'s refusal as an error).
    fn send(
        from: &mut rustls::Connection,
        to: &mut rustls::Connection,
        receiver: &str,
    ) -> Result<(), String> {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).unwrap();
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().map_err(|e| format!("the {receiver} refused: {e}"))?;
        }
        Ok(())
    }

    fn with_crl(dir: &Path, name: &str, crl: &Path) -> Result<std::sync::Arc<crate::Tls>, crate::TlsError> {
        crate::Tls::load(crate::TlsFiles { crl: Some(crl.to_owned()), ..files(dir, name) })
    }

    #[test]
    fn a_revoked_certificate_is_refused_at_the_handshake_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path(), &default_identities()).unwrap();
        let crl = crl_path(dir.path());
        // The list the CA starts with revokes nothing.
        let coordinator = with_crl(dir.path(), "coordinator", &crl).unwrap();
        let client = with_crl(dir.path(), "client", &crl).unwrap();
        handshake(&client, &coordinator).unwrap();
        let revoked = revoke(dir.path(), &["client".to_owned()], 30).unwrap();
        assert_eq!((revoked.added, revoked.listed), (vec!["client".to_owned()], 1));
        assert!(coordinator.reload().unwrap().contains("1 certificate(s) revoked"));
        // As a client of the coordinator, and as a server the coordinator calls.
        let refused = handshake(&client, &coordinator).unwrap_err();
        assert!(
            refused.contains("server refused") && refused.to_lowercase().contains("revoked"),
            "{refused}"
        );
        let refused = handshake(&coordinator, &client).unwrap_err();
        assert!(
            refused.contains("client refused") && refused.to_lowercase().contains("revoked"),
            "{refused}"
        );
        // Another identity still gets in; and without the list the CA alone vouches for the client.
        let operator = with_crl(dir.path(), "operator", &crl).unwrap();
        handshake(&operator, &coordinator).unwrap();
        let unlisted = crate::Tls::load(files(dir.path(), "coordinator")).unwrap();
        handshake(&client, &unlisted).unwrap();
        // Revoking again keeps what was listed, under the next number.
        let again = revoke(dir.path(), &["client".to_owned(), "p1".to_owned()], 30).unwrap();
        assert_eq!((again.added, again.listed), (vec!["p1".to_owned()], 2));
        let (_, number) = listed(&crl).unwrap();
        assert_eq!(number, 3, "made with 1, then 2, then 3");
        coordinator.reload().unwrap();
        assert!(handshake(&client, &coordinator).is_err());
        handshake(&operator, &coordinator).unwrap();
    }

    #[test]
    fn a_revocation_list_that_cannot_serve_is_refused_at_load_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path(), &default_identities()).unwrap();
        let crl = crl_path(dir.path());
        revoke(dir.path(), &["p2".to_owned()], 30).unwrap();
        // This process's own certificate revoked: said at once at start, not at each peer's refusal.
        let err = with_crl(dir.path(), "p2", &crl).unwrap_err().to_string();
        assert!(err.contains("revokes this process's own certificate"), "{err}");
        // At a reload the list is taken all the same (what else it revokes is refused from then on).
        let p3 = with_crl(dir.path(), "p3", &crl).unwrap();
        let p1_plain = crate::Tls::load(files(dir.path(), "p1")).unwrap();
        handshake(&p1_plain, &p3).unwrap();
        revoke(dir.path(), &["p1".to_owned(), "p3".to_owned()], 30).unwrap();
        assert!(p3.reload().unwrap().contains("revokes this process's own certificate"));
        assert!(handshake(&p1_plain, &p3).unwrap_err().to_lowercase().contains("revoked"));
        // Another CA's list: every peer's status would be unknown.
        let other = tempfile::tempdir().unwrap();
        make(other.path(), &[Identity::parse("client").unwrap()]).unwrap();
        let err = with_crl(dir.path(), "p1", &crl_path(other.path())).unwrap_err().to_string();
        assert!(err.contains("every peer would be refused"), "{err}");
        // A certificate of another CA is not revoked here: refused, the list as it was.
        std::fs::copy(cert_path(other.path(), "client"), cert_path(dir.path(), "stranger")).unwrap();
        let before = std::fs::read(&crl).unwrap();
        let err = revoke(dir.path(), &["stranger".to_owned()], 30);
        assert!(err.as_ref().is_err_and(|e| e.contains("not signed by the CA")), "{err:?}");
        assert_eq!(std::fs::read(&crl).unwrap(), before);
        // Not a list at all; none in the file; a missing file.
        let garbage = dir.path().join("garbage.crl");
        std::fs::write(&garbage, "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap();
        assert!(with_crl(dir.path(), "p1", &garbage).is_err());
        std::fs::write(&garbage, "nothing here").unwrap();
        assert!(with_crl(dir.path(), "p1", &garbage).unwrap_err().to_string().contains("no revocation list"));
        assert!(with_crl(dir.path(), "p1", &dir.path().join("absent.crl")).is_err());
        // A reload that fails keeps the material in use: p2 is still refused, the coordinator still let in.
        let observer = with_crl(dir.path(), "observer", &crl).unwrap();
        std::fs::copy(&garbage, &crl).unwrap();
        assert!(observer.reload().is_err());
        let p2 = crate::Tls::load(files(dir.path(), "p2")).unwrap();
        assert!(handshake(&p2, &observer).unwrap_err().to_lowercase().contains("revoked"));
        let coordinator = crate::Tls::load(files(dir.path(), "coordinator")).unwrap();
        handshake(&coordinator, &observer).unwrap();
    }

    #[test]
    fn a_revocation_list_needs_the_rest_of_the_material() {
        let args = crate::TlsArgs { tls_crl: Some("ca.crl".into()), ..Default::default() };
        assert!(args.files().unwrap_err().contains("--tls-crl needs"));
    }

    #[test]
    fn made_certificates_load_name_their_identity_and_share_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let made = make(dir.path(), &default_identities()).unwrap();
        assert!(made.ca_created);
        let tls = crate::Tls::load(files(dir.path(), "p1")).unwrap();
        assert_eq!(tls.identity().as_deref(), Some("p1"));
        // A name added later is signed by the same CA, and the policy keeps the others.
        let ca = std::fs::read(ca_path(dir.path())).unwrap();
        let again = make(dir.path(), &[Identity::parse("p4").unwrap()]).unwrap();
        assert!(!again.ca_created);
        assert_eq!(std::fs::read(ca_path(dir.path())).unwrap(), ca);
        let policy = crate::policy::Policy::read(&policy_path(dir.path())).unwrap();
        assert!(policy.check("/decree.v1.Registry/Enroll", Some("p4")).is_ok());
        assert!(policy.check("/decree.v1.Participant/Prepare", Some("coordinator")).is_ok());
        assert!(policy.check("/decree.v1.Participant/Resolve", Some("operator")).is_ok());
        assert!(policy.check("/decree.v1.Participant/Resolve", Some("client")).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path(), "p4")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
