//! `decree certs`: a development CA, a certificate for each identity of a
//! local cluster, and the policy that gives each its role; `--revoke` adds
//! identities' certificates to the CA's revocation list.

use std::path::PathBuf;

use decree_tls::certs::{self, Identity};

use crate::Failure;

#[derive(clap::Args)]
pub struct CertsArgs {
    /// The directory to write into (created); a CA already there signs the new certificates.
    #[arg(long, default_value = "decree-certs")]
    out: PathBuf,
    /// Days the certificates are valid (with --revoke: until the list's next-update date).
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Revoke the certificate of this identity in --out instead (repeatable): the CA's revocation
    /// list (--out/ca.crl, what --tls-crl takes) names it from then on; processes reload the list.
    #[arg(long, value_name = "NAME", conflicts_with = "identities")]
    revoke: Vec<String>,
    /// Identities, as NAME or NAME=ROLE[+ROLE...] (roles: participant, coordinator, client,
    /// operator, observer; without one it follows from the name: coordinator*, client*,
    /// operator*, observer*, else participant). Default: coordinator p1 p2 p3 client operator observer.
    identities: Vec<String>,
}

pub fn run(args: CertsArgs) -> Result<i32, Failure> {
    let identities = match args.identities.is_empty() {
        true => certs::default_identities(),
        false => args.identities.iter().map(|text| Identity::parse(text)).collect::<Result<Vec<_>, _>>()?,
    };
    if args.days == 0 {
        return Err(Failure("--days must be at least 1".into()));
    }
    if !args.revoke.is_empty() {
        return revoke(&args);
    }
    let made = certs::make_valid_for(&args.out, &identities, args.days)?;
    let dir = args.out.display();
    let names: Vec<&str> = identities.iter().map(|i| i.name.as_str()).collect();
    match made.ca_created {
        true => println!(
            "decree certs: a development CA in {dir}/ca.crt (its key: {dir}/ca.key, keep it private)"
        ),
        false => println!("decree certs: signed by the CA already in {dir}/ca.crt"),
    }
    for identity in &identities {
        let roles: Vec<&str> = identity.roles.iter().map(|r| r.as_str()).collect();
        println!(
            "  {:<12} {dir}/{}.crt, {dir}/{}.key  ({})",
            identity.name,
            identity.name,
            identity.name,
            roles.join(", ")
        );
    }
    println!("  policy       {dir}/policy.toml");
    println!("  revoked      {dir}/ca.crl  (decree certs --revoke NAME --out {dir})");
    println!();
    println!("mutual TLS for a local cluster (each process takes its own certificate and key):");
    println!(
        "  export DECREE_TLS_CA={dir}/ca.crt DECREE_TLS_CRL={dir}/ca.crl DECREE_POLICY={dir}/policy.toml"
    );
    let has = |name: &str| names.contains(&name);
    if has("coordinator") {
        println!(
            "  decree coordinator --listen 127.0.0.1:7000 --data-dir data/c \
             --tls-cert {dir}/coordinator.crt --tls-key {dir}/coordinator.key &"
        );
    }
    if let Some(p) = identities.iter().find(|i| i.roles.contains(&decree_tls::policy::Role::Participant)) {
        let p = &p.name;
        println!(
            "  decree participant --name {p} --listen 127.0.0.1:7001 --data-dir data/{p} --join \
             --coordinator https://127.0.0.1:7000 --tls-cert {dir}/{p}.crt --tls-key {dir}/{p}.key &"
        );
    }
    if has("client") {
        println!(
            "  decree txn --coordinator https://127.0.0.1:7000 --tls-cert {dir}/client.crt \
             --tls-key {dir}/client.key --put greeting=hello"
        );
    }
    Ok(0)
}

fn revoke(args: &CertsArgs) -> Result<i32, Failure> {
    let revoked = certs::revoke(&args.out, &args.revoke, args.days)?;
    let dir = args.out.display();
    for name in &args.revoke {
        match revoked.added.contains(name) {
            true => println!("decree certs: revoked {dir}/{name}.crt"),
            false => println!("decree certs: {dir}/{name}.crt was revoked already"),
        }
    }
    println!(
        "  {dir}/ca.crl names {} certificate(s); processes started with --tls-crl {dir}/ca.crl \
         refuse them at the next handshake (the list is reloaded on change or SIGHUP)",
        revoked.listed
    );
    Ok(0)
}
