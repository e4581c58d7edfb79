//! The administration behind `mailctl domain|user|alias|filer`: argument checking, then one
//! change of the location database (each change is one transaction there).

use anyhow::{Context as _, bail};
use common::address::{Address, Domain};
use common::location::{
    ChangeError, Credentials, Directory, Filer, FilerState, Mailbox, NewMailbox,
};

/// Parses a domain an operator typed: a name (not an address literal), in ASCII form.
pub fn parse_domain(s: &str) -> anyhow::Result<String> {
    let d = Domain::parse_name(s.trim()).with_context(|| format!("{s:?} is not a valid domain"))?;
    if !d.as_str().contains('.') {
        bail!("{s:?} is not a fully qualified domain");
    }
    Ok(d.as_str().to_owned())
}

/// Parses the address of a new mailbox. Mailbox names are used as directory names on filers
/// and as SASL user names, so they are kept to a conservative set: letters, digits and `. _ + -`
/// in the local part (no `%`, `!`, quotes, `,` or `=`, which SCRAM and routing would misread).
pub fn parse_mailbox_address(s: &str) -> anyhow::Result<Address> {
    let a = Address::parse(s.trim()).with_context(|| format!("{s:?} is not a valid address"))?;
    let local = a.local_part();
    let ok = !local.is_empty()
        && !local.starts_with('.')
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if !ok || a.domain().is_literal() {
        bail!(
            "{s:?}: a mailbox address may only use letters, digits and . _ + - before the @, and a domain name after it"
        );
    }
    Ok(a)
}

/// Parses any address (alias targets may be remote).
pub fn parse_address(s: &str) -> anyhow::Result<Address> {
    Address::parse(s.trim()).with_context(|| format!("{s:?} is not a valid address"))
}

/// `mailctl domain add`.
pub async fn domain_add(db: &dyn Directory, domain: &str) -> anyhow::Result<String> {
    let d = parse_domain(domain)?;
    db.add_domain(&d).await?;
    Ok(d)
}

/// `mailctl domain remove`.
pub async fn domain_remove(db: &dyn Directory, domain: &str) -> anyhow::Result<String> {
    let d = parse_domain(domain)?;
    db.remove_domain(&d).await?;
    Ok(d)
}

/// `mailctl user add`: hashes the password off the async workers, then one transaction that
/// checks the domain, places the mailbox and stores it with its credentials.
pub async fn user_add(
    db: &dyn Directory,
    address: &str,
    password: String,
    quota: u64,
    filer: Option<String>,
) -> anyhow::Result<Mailbox> {
    let a = parse_mailbox_address(address)?;
    let key = a.key();
    // Check cheap things before the slow hash, so a typo fails at once.
    let domain = a.domain().as_str().to_owned();
    if !db.is_hosted_domain(&domain).await? {
        return Err(ChangeError::DomainNotHosted(domain).into());
    }
    let credentials = hash(password).await?;
    Ok(db
        .add_mailbox(NewMailbox {
            address: key,
            credentials,
            quota,
            filer,
        })
        .await?)
}

/// `mailctl user passwd`.
pub async fn user_passwd(
    db: &dyn Directory,
    address: &str,
    password: String,
) -> anyhow::Result<String> {
    let key = parse_address(address)?.key();
    if db.mailbox(&key).await?.is_none() {
        return Err(ChangeError::NotFound(format!("mailbox {key}")).into());
    }
    let credentials = hash(password).await?;
    db.set_credentials(&key, credentials).await?;
    Ok(key)
}

async fn hash(password: String) -> anyhow::Result<Credentials> {
    Ok(tokio::task::spawn_blocking(move || Credentials::from_password(&password)).await??)
}

/// `mailctl alias add`.
pub async fn alias_add(
    db: &dyn Directory,
    alias: &str,
    target: &str,
) -> anyhow::Result<(String, String)> {
    let a = parse_address(alias)?;
    if a.has_routing_syntax() {
        bail!("{alias:?}: an alias may not contain '%', '!' or a quoted '@'");
    }
    let t = parse_address(target)?;
    let (a, t) = (a.key(), t.key());
    db.add_alias(&a, &t).await?;
    Ok((a, t))
}

/// `mailctl filer add`.
pub async fn filer_add(db: &dyn Directory, filer: Filer) -> anyhow::Result<()> {
    for (what, addr) in [
        ("lmtp", &filer.lmtp),
        ("imap", &filer.imap),
        ("pop3", &filer.pop3),
    ] {
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
            bail!("--{what} {addr:?} is not a host:port");
        }
    }
    if filer.name.is_empty()
        || !filer
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!(
            "{:?} is not a valid filer name (letters, digits, - _ .)",
            filer.name
        );
    }
    db.add_filer(&filer).await?;
    Ok(())
}

/// `mailctl filer set-state`.
pub async fn filer_set_state(
    db: &dyn Directory,
    name: &str,
    state: FilerState,
) -> anyhow::Result<()> {
    db.set_filer_state(name, state).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_addresses_are_conservative() {
        assert_eq!(
            parse_mailbox_address("A.b+c@Example.TEST").unwrap().key(),
            "a.b+c@example.test"
        );
        for bad in [
            "a/b@example.test",
            "\"a b\"@example.test",
            "a%b@example.test",
            "a,b@example.test",
            "a@[127.0.0.1]",
            ".a@example.test",
            "nobody",
        ] {
            assert!(parse_mailbox_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains_are_normalised() {
        assert_eq!(parse_domain("Example.TEST").unwrap(), "example.test");
        assert_eq!(
            parse_domain("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert!(parse_domain("localhost").is_err());
        assert!(parse_domain("a..b").is_err());
    }
}
