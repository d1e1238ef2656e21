//! A development CA and certificates for a local cluster (`decree certs`).
//!
//! Each certificate names its identity first among its DNS names, then
//! `localhost` and `127.0.0.1` (so a local URL verifies), and serves both as
//! a server's and a client's certificate. The CA is kept in the directory
//! and used again for names added later. A `policy.toml` beside them gives
//! each identity its role.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

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

/// The TLS files of identity `name` in `dir`.
pub fn files(dir: &Path, name: &str) -> crate::TlsFiles {
    crate::TlsFiles { cert: cert_path(dir, name), key: key_path(dir, name), ca: ca_path(dir) }
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
