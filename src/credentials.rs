//! How a command logs in to NATS, checked before it connects, and the
//! one function that keeps secrets out of what it prints.
//!
//! - [`ServerUrls::parse`] reads `--nats-url`: each URL may carry a user
//!   and password (`nats://USER:PASSWORD@host`) or a token
//!   (`nats://TOKEN@host`), which async-nats would silently ignore. They are
//!   taken out of the URLs (async-nats never sees them, so none of its
//!   errors or logs can show them) and become a [`Login`].
//! - [`login`] gathers every way to log in the settings give (flags,
//!   `DISPATCH_*` variables and the `--config` file alike, and the URLs) and
//!   refuses more than one: a connection logs in one way, and taking one
//!   while ignoring another would hide a mistake.
//! - The files named by the settings are read and checked here, so that a
//!   bad one is reported by name with what a good one looks like (an NKey
//!   seed starts with `SU`; a CA file holds `-----BEGIN CERTIFICATE-----`
//!   blocks), not as a failed handshake later.
//! - [`redact`] masks the user information of every URL in a text; every
//!   message that may hold a URL goes through it.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use async_nats::rustls::pki_types::pem::{self, PemObject as _};
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::{ConnectOptions, ServerAddr};

use crate::config::Connection;

/// What a valid NKey seed file holds, for error messages.
const SEED_SHAPE: &str = "a user NKey seed is one line of 58 characters starting with `SU` \
                          (as `nk -gen user` or `nsc` writes it)";

/// How a connection logs in. Its `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Login {
    /// User and password (`--nats-user`/`--nats-password`, or
    /// `nats://USER:PASSWORD@host`).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// Token (`--nats-token`, or `nats://TOKEN@host`).
    Token(String),
    /// Credentials file (`--nats-creds`), already read and checked.
    Creds {
        /// Where it was read from.
        path: PathBuf,
        /// What it holds.
        contents: String,
    },
    /// NKey seed file (`--nats-nkey`), already read and checked.
    NKey {
        /// Where it was read from.
        path: PathBuf,
        /// The seed (`SU…`).
        seed: String,
    },
}

impl Login {
    /// What it is, in a few words.
    fn describe(&self) -> &'static str {
        match self {
            Login::UserPassword { .. } => "a user and password",
            Login::Token(_) => "a token",
            Login::Creds { .. } => "a credentials file",
            Login::NKey { .. } => "an NKey seed file",
        }
    }

    /// `options` logging in this way.
    pub fn apply(self, options: ConnectOptions) -> anyhow::Result<ConnectOptions> {
        Ok(match self {
            Login::UserPassword { user, password } => options.user_and_password(user, password),
            Login::Token(token) => options.token(token),
            Login::Creds { path, contents } => options
                .credentials(&contents)
                .map_err(|e| creds_error(&path, &e))?,
            Login::NKey { seed, .. } => options.nkey(seed),
        })
    }
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Login::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"***")
                .finish(),
            Login::Token(_) => f.debug_tuple("Token").field(&"***").finish(),
            Login::Creds { path, .. } => f.debug_struct("Creds").field("path", path).finish(),
            Login::NKey { path, .. } => f.debug_struct("NKey").field("path", path).finish(),
        }
    }
}

/// The servers of `--nats-url` without credentials, and the login their
/// URLs carried.
#[derive(Debug)]
pub struct ServerUrls {
    /// The servers, without user information.
    pub addrs: Vec<ServerAddr>,
    /// The login the URLs carried (the same in every URL that had one).
    pub login: Option<Login>,
}

impl ServerUrls {
    /// Reads `urls`, taking the user information out of each. A URL
    /// without any uses the others' login; URLs with different ones are an
    /// error, since one connection logs in one way to every server.
    pub fn parse(urls: &[String]) -> anyhow::Result<Self> {
        if urls.is_empty() {
            bail!("--nats-url names no server");
        }
        let mut addrs = Vec::with_capacity(urls.len());
        let mut login: Option<Login> = None;
        for (i, entry) in urls.iter().enumerate() {
            let shown = format!(
                "server URL number {} of --nats-url (`{}`)",
                i + 1,
                outline(entry.trim())
            );
            let (addr, found) = parse_url(entry.trim(), &shown)?;
            if let Some(found) = found {
                match &login {
                    None => login = Some(found),
                    Some(first) if *first == found => {}
                    Some(_) => bail!(
                        "the URLs of --nats-url carry different credentials; one connection \
                         logs in the same way to every server: give the same ones in each URL, \
                         or give them once with --nats-user/--nats-password or --nats-token"
                    ),
                }
            }
            addrs.push(addr);
        }
        Ok(Self { addrs, login })
    }

    /// The servers as one comma-separated text, for messages (nothing
    /// secret left in it).
    pub fn shown(&self) -> String {
        self.addrs
            .iter()
            .map(|a| a.as_url_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One server URL: the address without user information, and the login
/// it carried.
fn parse_url(entry: &str, shown: &str) -> anyhow::Result<(ServerAddr, Option<Login>)> {
    if entry.is_empty() {
        bail!("{shown} is empty");
    }
    let addr: ServerAddr = entry
        .parse()
        .map_err(|e| anyhow!("{shown} is not valid: {e}"))?;
    let mut url = addr.into_inner();
    let user = percent_decode(url.username()).with_context(|| format!("in {shown}"))?;
    let password = url
        .password()
        .map(percent_decode)
        .transpose()
        .with_context(|| format!("in {shown}"))?;
    let colon = userinfo(entry).is_some_and(|u| u.contains(':'));
    let login = match (user.is_empty(), password) {
        (true, None) if !colon => None,
        (true, _) => bail!("{shown} has a password but no user: write nats://USER:PASSWORD@host"),
        (false, Some(password)) => Some(Login::UserPassword { user, password }),
        (false, None) if colon => bail!(
            "{shown} has a user but an empty password: write nats://USER:PASSWORD@host, \
             or nats://TOKEN@host for a token"
        ),
        (false, None) => Some(Login::Token(user)),
    };
    if login.is_some() && (url.set_password(None).is_err() || url.set_username("").is_err()) {
        bail!("{shown}: its credentials could not be taken out of it");
    }
    let addr = ServerAddr::from_url(url).map_err(|e| anyhow!("{shown} is not valid: {e}"))?;
    Ok((addr, login))
}

/// The start of a URL that may not parse, safe to show: the scheme, the
/// user information masked, and what follows up to the first `:` or `/`
/// (`nats://***@host…` of `nats://u:p@host:port`), since a password that
/// cut the URL short may follow either.
fn outline(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let (masked, rest) = match rest.rsplit_once('@') {
        Some((_, host)) => ("***@", host),
        None => ("", rest),
    };
    let head = rest.split([':', '/']).next().unwrap_or_default();
    let more = if head.len() < rest.len() { "…" } else { "" };
    format!("{scheme}{masked}{head}{more}")
}

/// The user information of a URL as written (`user:pass` of
/// `nats://user:pass@host`), up to the last `@`.
fn userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.rsplit_once('@').map(|(info, _)| info)
}

/// `%XX` escapes decoded (a `%` not followed by two hex digits stays).
fn percent_decode(text: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let (h, l) = (hex(h).unwrap_or(0), hex(l).unwrap_or(0));
                out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    // The text itself is not shown: it is a user, password or token.
    String::from_utf8(out).map_err(|_| anyhow!("the credentials decode to invalid UTF-8"))
}

/// The one login the settings give, checked, and the servers without
/// credentials. More than one way to log in is an error that names them.
pub fn login(connection: &Connection) -> anyhow::Result<(Vec<ServerAddr>, Option<Login>)> {
    let servers = ServerUrls::parse(&connection.nats_url)?;
    // Each way to log in that is given, and where it was given.
    let mut given: Vec<(Given, &'static str)> = Vec::new();
    match (&connection.nats_user, &connection.nats_password) {
        (Some(user), Some(password)) => given.push((
            Given::Login(Login::UserPassword {
                user: user.clone(),
                password: password.clone(),
            }),
            "--nats-user/--nats-password",
        )),
        (Some(_), None) => bail!("--nats-user needs --nats-password (or DISPATCH_NATS_PASSWORD)"),
        (None, Some(_)) => bail!("--nats-password needs --nats-user (or DISPATCH_NATS_USER)"),
        (None, None) => {}
    }
    if let Some(token) = &connection.nats_token {
        given.push((Given::Login(Login::Token(token.clone())), "--nats-token"));
    }
    if let Some(path) = &connection.nats_creds {
        given.push((Given::Creds(path.clone()), "--nats-creds"));
    }
    if let Some(path) = &connection.nats_nkey {
        given.push((Given::NKey(path.clone()), "--nats-nkey"));
    }
    if let Some(login) = servers.login {
        // The same login in the URL and in the flags says one thing twice.
        if !given
            .iter()
            .any(|(g, _)| matches!(g, Given::Login(l) if *l == login))
        {
            given.push((Given::Login(login), "in --nats-url"));
        }
    }
    if given.len() > 1 {
        let named: Vec<String> = given
            .iter()
            .map(|(g, from)| format!("{} ({from})", g.describe()))
            .collect();
        bail!(
            "conflicting NATS credentials: {}; a connection logs in one way only, so give one \
             of them (flags, DISPATCH_* variables and the --config file count alike)",
            named.join(" and ")
        );
    }
    let login = match given.pop() {
        None => None,
        Some((Given::Login(login), _)) => Some(login),
        Some((Given::Creds(path), _)) => Some(read_creds(&path)?),
        Some((Given::NKey(path), _)) => Some(read_seed(&path)?),
    };
    check_tls(connection)?;
    Ok((servers.addrs, login))
}

/// A way to log in as given, before its file is read.
enum Given {
    Login(Login),
    Creds(PathBuf),
    NKey(PathBuf),
}

impl Given {
    fn describe(&self) -> &'static str {
        match self {
            Given::Login(login) => login.describe(),
            Given::Creds(_) => "a credentials file",
            Given::NKey(_) => "an NKey seed file",
        }
    }
}

/// Reads and checks an NKey seed file; no error shows the seed.
pub fn read_seed(path: &Path) -> anyhow::Result<Login> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the NKey seed file {}", path.display()))?;
    let seed = text.trim();
    if seed.contains("BEGIN NATS USER JWT") {
        bail!(
            "the NKey seed file {} is a credentials file (JWT and seed): give it with \
             --nats-creds instead",
            path.display()
        );
    }
    let pair = nkeys::KeyPair::from_seed(seed).map_err(|e| {
        anyhow!(
            "the NKey seed file {} does not hold a valid seed ({}): {SEED_SHAPE}",
            path.display(),
            e.kind()
        )
    })?;
    let kind = pair.key_pair_type();
    if kind != nkeys::KeyPairType::User {
        bail!(
            "the NKey seed file {} holds the seed of {kind:?} key, not of a user: {SEED_SHAPE}",
            path.display()
        );
    }
    Ok(Login::NKey {
        path: path.to_owned(),
        seed: seed.to_owned(),
    })
}

/// Reads and checks a credentials file.
pub fn read_creds(path: &Path) -> anyhow::Result<Login> {
    let contents = std::fs::read_to_string(path)
        .with_context(|| format!("reading the credentials file {}", path.display()))?;
    // Parsed now (and again when applied), so a bad file fails here.
    ConnectOptions::new()
        .credentials(&contents)
        .map_err(|e| creds_error(path, &e))?;
    Ok(Login::Creds {
        path: path.to_owned(),
        contents,
    })
}

fn creds_error(path: &Path, error: &std::io::Error) -> anyhow::Error {
    anyhow!(
        "the credentials file {} cannot be used ({error}): it must hold a user JWT and a user \
         NKey seed (`SU…`), each between `-----BEGIN …-----` and `------END …------` lines, as \
         `nsc generate creds` writes it",
        path.display()
    )
}

/// Checks that `--tls-ca`, `--tls-cert` and `--tls-key` hold what they
/// should, in PEM; async-nats would skip what it cannot read and fail the
/// handshake later with a less telling error.
pub fn check_tls(connection: &Connection) -> anyhow::Result<()> {
    if let Some(path) = &connection.tls_ca {
        let mut roots = async_nats::rustls::RootCertStore::empty();
        for cert in certificates("--tls-ca", path)? {
            roots.add(cert).map_err(|e| {
                anyhow!(
                    "--tls-ca {}: a certificate in it cannot be a CA: {e}",
                    path.display()
                )
            })?;
        }
    }
    if let Some(path) = &connection.tls_cert {
        certificates("--tls-cert", path)?;
    }
    if let Some(path) = &connection.tls_key {
        // The error's details are left out: they could quote the key.
        PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
            pem::Error::Io(e) => anyhow!("reading --tls-key {}: {e}", path.display()),
            _ => anyhow!(
                "--tls-key {} holds no PEM private key: expected a `-----BEGIN PRIVATE KEY-----` \
                 (or `RSA PRIVATE KEY`, `EC PRIVATE KEY`) block",
                path.display()
            ),
        })?;
    }
    Ok(())
}

/// The certificates of a PEM file: at least one.
fn certificates(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let read = |e: pem::Error| match e {
        pem::Error::Io(e) => anyhow!("reading {flag} {}: {e}", path.display()),
        other => anyhow!("{flag} {} is not a valid PEM file: {other}", path.display()),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        bail!(
            "{flag} {} holds no PEM certificate: expected one or more \
             `-----BEGIN CERTIFICATE-----` blocks (a DER file converts with \
             `openssl x509 -inform der -in FILE -out FILE.pem`)",
            path.display()
        );
    }
    Ok(certs)
}

/// `text` with the user information of every URL in it masked:
/// `nats://ops:s3cret@host` → `nats://ops:***@host`, `nats://TOKEN@host`
/// → `nats://***@host`. A URL ends at white space, a quote, a bracket or a
/// comma; its user information runs to its last `@`, so a password with
/// an unescaped `/` or `?` is masked too.
///
/// ```
/// use dispatcher::credentials::redact;
///
/// assert_eq!(
///     redact("connecting to nats://ops:s3cret@h:4222,nats://tok@g failed"),
///     "connecting to nats://ops:***@h:4222,nats://***@g failed"
/// );
/// ```
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || "\"'`,()[]{}<>".contains(c))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        match url.rsplit_once('@') {
            Some((info, host)) => {
                match info.split_once(':') {
                    Some((user, _)) if !user.contains('/') => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    _ => out.push_str("***"),
                }
                out.push('@');
                out.push_str(host);
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The URLs as given (`--nats-url`), masked and comma-separated, for
/// messages. Unlike [`redact`], it also masks a URL written without a
/// scheme (`ops:s3cret@host:4222`).
pub fn redact_urls(urls: &[String]) -> String {
    urls.iter()
        .map(|u| {
            if u.contains("://") {
                redact(u).into_owned()
            } else {
                redact(&format!("://{u}"))[3..].to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests;
