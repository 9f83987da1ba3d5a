use std::io::Write as _;

use clap::Parser as _;

use super::*;

/// A password that must never show up in any message.
const SECRET: &str = "s3cr3t-Pa55";

/// A self-signed test CA (EC P-256, made with `openssl req -x509`), with
/// its key: only for these tests.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkDCCATegAwIBAgIUXLRp6R7U0xlYSBSbm5epfMGPxDwwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSZGlzcGF0Y2hlciB0ZXN0IENBMCAXDTI2MTIwMzE5MjQ1NFoY
DzIxMjYxMTA5MTkyNDU0WjAdMRswGQYDVQQDDBJkaXNwYXRjaGVyIHRlc3QgQ0Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASRAoRfnoZK7b0X+1s2E+bDY5EThW7S
sYVBM21F5oUZ4ex2kq3T2mZz4k3QTCp0Zq0aZzY7JDAyHWEXcbh49M3qo1MwUTAd
BgNVHQ4EFgQUm+FW+PBjKVizBBp9dbQ6uTDiDKswHwYDVR0jBBgwFoAUm+FW+PBj
KVizBBp9dbQ6uTDiDKswDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBE
AiBnVbrOKqPjgUQEdK5BszUDdF7F1UHUlIe0zA+Y99SBOgIgW/VkaRen/8Yh02ap
JnK0At/vXfVZHeEF6GyrFP0mgRU=
-----END CERTIFICATE-----
";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg24WL3Uq3xGGmxw3u
GnWCr6daUqI5g4Njv1iSsc3oMV6hRANCAASRAoRfnoZK7b0X+1s2E+bDY5EThW7S
sYVBM21F5oUZ4ex2kq3T2mZz4k3QTCp0Zq0aZzY7JDAyHWEXcbh49M3q
-----END PRIVATE KEY-----
";

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
}

fn connection(args: &[&str]) -> Connection {
    let mut all = vec!["test"];
    all.extend(args);
    Cli::try_parse_from(all).unwrap().connection
}

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

fn urls(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The error's whole chain and its debug form.
fn message(err: &anyhow::Error) -> String {
    format!("{err:#} / {err:?}")
}

#[test]
fn url_credentials_become_the_login_and_leave_the_url() {
    let parsed = ServerUrls::parse(&urls(&["nats://ops:s3cret@127.0.0.1:4222"])).unwrap();
    assert_eq!(parsed.shown(), "nats://127.0.0.1:4222");
    assert_eq!(
        parsed.login,
        Some(Login::UserPassword {
            user: "ops".into(),
            password: "s3cret".into()
        })
    );
    // A user alone is a token, as in the other NATS clients.
    let parsed = ServerUrls::parse(&urls(&["nats://t0ken@h:4222"])).unwrap();
    assert_eq!(parsed.shown(), "nats://h:4222");
    assert_eq!(parsed.login, Some(Login::Token("t0ken".into())));
    // Percent-encoded characters are decoded; the last `@` ends the login.
    let parsed = ServerUrls::parse(&urls(&["tls://op%40s:p%3Aw@ss@h"])).unwrap();
    assert_eq!(parsed.shown(), "tls://h");
    assert_eq!(
        parsed.login,
        Some(Login::UserPassword {
            user: "op@s".into(),
            password: "p:w@ss".into()
        })
    );
    // Without a scheme, as async-nats accepts.
    let parsed = ServerUrls::parse(&urls(&["ops:pw@h:4223"])).unwrap();
    assert_eq!(parsed.shown(), "nats://h:4223");
    assert!(matches!(parsed.login, Some(Login::UserPassword { .. })));
    // No credentials: nothing changes.
    let parsed = ServerUrls::parse(&urls(&["nats://a:4222", "b:4223"])).unwrap();
    assert_eq!(parsed.shown(), "nats://a:4222,nats://b:4223");
    assert_eq!(parsed.login, None);
}

#[test]
fn several_urls_share_one_login() {
    let same = ServerUrls::parse(&urls(&["nats://u:p@a", "nats://u:p@b", "nats://c"])).unwrap();
    assert_eq!(same.shown(), "nats://a,nats://b,nats://c");
    assert_eq!(
        same.login,
        Some(Login::UserPassword {
            user: "u".into(),
            password: "p".into()
        })
    );
    for list in [
        ["nats://u:p@a", &format!("nats://u:{SECRET}@b")],
        ["nats://u:p@a", &format!("nats://{SECRET}@b")],
    ] {
        let err = ServerUrls::parse(&urls(&list)).unwrap_err();
        let text = message(&err);
        assert!(text.contains("different credentials"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }
}

#[test]
fn no_error_shows_a_password() {
    let cases = [
        // Not a URL (the port is the password's end).
        format!("nats://ops:{SECRET}@host:port"),
        format!("nats://ops:{SECRET}"),
        // A `,` or `/` unescaped in a password cuts the URL.
        format!("nats://ops:{SECRET}/x@host"),
        // An empty password, or a password without a user.
        format!("nats://{SECRET}:@host"),
        format!("nats://:{SECRET}@host"),
    ];
    for url in &cases {
        let err = ServerUrls::parse(&urls(&[url, "nats://other"])).unwrap_err();
        let text = message(&err);
        assert!(!text.contains(SECRET), "{url}: {text}");
        assert!(
            text.contains("server URL number 1 of --nats-url"),
            "{url}: {text}"
        );
    }
    // What does not parse is shown as far as it is safe.
    let err = ServerUrls::parse(&urls(&["nats://a:4222", "nats://host:42x2"])).unwrap_err();
    assert!(
        message(&err).contains("server URL number 2 of --nats-url (`nats://host…`) is not valid"),
        "{err:#}"
    );
    // A conflict names both sources, never the values.
    let url = format!("nats://ops:{SECRET}@host");
    let err = login(&connection(&["--nats-url", &url, "--nats-token", SECRET])).unwrap_err();
    let text = message(&err);
    assert!(!text.contains(SECRET), "{text}");
    // Neither does the Debug form of the settings or of a login.
    let c = connection(&[
        "--nats-url",
        &url,
        "--nats-user",
        "ops",
        "--nats-password",
        SECRET,
    ]);
    let debug = format!("{c:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("ops:***@host"), "{debug}");
    let parsed = ServerUrls::parse(&urls(&[&url])).unwrap();
    let debug = format!("{parsed:?}");
    assert!(!debug.contains(SECRET), "{debug}");
}

#[test]
fn redaction_masks_every_url_in_a_text() {
    assert_eq!(
        redact(&format!(
            "connecting to NATS at nats://ops:{SECRET}@h:4222: refused"
        )),
        "connecting to NATS at nats://ops:***@h:4222: refused"
    );
    assert_eq!(
        redact(&format!("`tls://{SECRET}@h`, (ws://u:{SECRET}@g/path)")),
        "`tls://***@h`, (ws://u:***@g/path)"
    );
    // A password with an unescaped `/` or `?` is masked whole.
    assert_eq!(redact(&format!("nats://u:a/{SECRET}?@h")), "nats://u:***@h");
    assert_eq!(
        redact("nats://h:4222 and no login"),
        "nats://h:4222 and no login"
    );
    assert_eq!(redact("no URL at all: a@b"), "no URL at all: a@b");
    assert_eq!(
        redact_urls(&urls(&[
            &format!("nats://u:{SECRET}@a"),
            &format!("u:{SECRET}@b:4222"),
            "c"
        ])),
        "nats://u:***@a,u:***@b:4222,c"
    );
}

#[test]
fn conflicting_logins_are_refused_naming_both() {
    let creds = file("not used");
    let nkey = file("not used");
    let cases: Vec<(Vec<&str>, [&str; 2])> = vec![
        (
            vec![
                "--nats-token",
                "t",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ],
            ["--nats-user/--nats-password", "--nats-token"],
        ),
        (
            vec!["--nats-url", "nats://u:p@h", "--nats-token", "t"],
            ["--nats-token", "in --nats-url"],
        ),
        (
            vec![
                "--nats-url",
                "nats://t@h",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ],
            ["--nats-user/--nats-password", "in --nats-url"],
        ),
        (
            vec![
                "--nats-url",
                "nats://u:other@h",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ],
            ["--nats-user/--nats-password", "in --nats-url"],
        ),
        (
            vec![
                "--nats-creds",
                creds.path().to_str().unwrap(),
                "--nats-nkey",
                nkey.path().to_str().unwrap(),
            ],
            ["--nats-creds", "--nats-nkey"],
        ),
        (
            vec![
                "--nats-token",
                "t",
                "--nats-nkey",
                nkey.path().to_str().unwrap(),
            ],
            ["--nats-token", "--nats-nkey"],
        ),
    ];
    for (args, named) in cases {
        let err = login(&connection(&args)).unwrap_err();
        let text = message(&err);
        assert!(
            text.contains("conflicting NATS credentials"),
            "{args:?}: {text}"
        );
        for name in named {
            assert!(text.contains(name), "{args:?}: {name} missing in {text}");
        }
    }
    // The same login in the URL and the flags is one login.
    let (servers, found) = login(&connection(&[
        "--nats-url",
        "nats://u:p@h",
        "--nats-user",
        "u",
        "--nats-password",
        "p",
    ]))
    .unwrap();
    assert_eq!(servers.len(), 1);
    assert!(matches!(found, Some(Login::UserPassword { .. })));
    // A user from the file alone (clap's `requires` sees only flags and
    // variables) is refused here.
    let mut c = connection(&[]);
    c.nats_user = Some("u".into());
    let err = login(&c).unwrap_err();
    assert!(message(&err).contains("--nats-password"), "{err:#}");
}

#[test]
fn a_bad_nkey_seed_file_is_named_and_the_seed_never_shown() {
    let garbage = file("SUgarbage-that-is-secret\n");
    let err = read_seed(garbage.path()).unwrap_err();
    let text = message(&err);
    assert!(
        text.contains(&garbage.path().display().to_string()),
        "{text}"
    );
    assert!(text.contains("starting with `SU`"), "{text}");
    assert!(!text.contains("garbage-that-is-secret"), "{text}");

    // A valid seed of the wrong kind (an account's) is refused too.
    let account = nkeys::KeyPair::new_account().seed().unwrap();
    let err = read_seed(file(&account).path()).unwrap_err();
    let text = message(&err);
    assert!(text.contains("not of a user"), "{text}");
    assert!(!text.contains(&account[2..]), "{text}");

    // A credentials file given as a seed file says so.
    let creds = file("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n");
    let err = read_seed(creds.path()).unwrap_err();
    assert!(message(&err).contains("--nats-creds"), "{err:#}");

    // A user seed (with its trailing newline) is taken.
    let user = nkeys::KeyPair::new_user().seed().unwrap();
    let good = file(&format!("{user}\n"));
    assert_eq!(
        read_seed(good.path()).unwrap(),
        Login::NKey {
            path: good.path().to_owned(),
            seed: user
        }
    );
    // A missing file is named.
    let err = read_seed(Path::new("/nonexistent/user.nk")).unwrap_err();
    assert!(message(&err).contains("/nonexistent/user.nk"), "{err:#}");
}

#[test]
fn a_bad_credentials_file_is_named() {
    let garbage = file("hello\n");
    let err = read_creds(garbage.path()).unwrap_err();
    let text = message(&err);
    assert!(
        text.contains(&garbage.path().display().to_string()),
        "{text}"
    );
    assert!(text.contains("nsc generate creds"), "{text}");
    // Through the settings, too.
    let err = login(&connection(&[
        "--nats-creds",
        garbage.path().to_str().unwrap(),
    ]))
    .unwrap_err();
    assert!(message(&err).contains("cannot be used"), "{err:#}");
}

#[test]
fn tls_files_must_hold_pem() {
    let ca = file(CA_PEM);
    let key = file(KEY_PEM);
    let not_pem = file("this is not a certificate\n");
    let ca_path = ca.path().to_str().unwrap();
    let key_path = key.path().to_str().unwrap();
    let bad = not_pem.path().to_str().unwrap();

    check_tls(&connection(&[
        "--tls-ca",
        ca_path,
        "--tls-cert",
        ca_path,
        "--tls-key",
        key_path,
    ]))
    .unwrap();

    let err = check_tls(&connection(&["--tls-ca", bad])).unwrap_err();
    let text = message(&err);
    assert!(text.contains("--tls-ca") && text.contains(bad), "{text}");
    assert!(text.contains("no PEM certificate"), "{text}");
    // Through `login`, which every connection goes through.
    let err = login(&connection(&["--tls-ca", bad])).unwrap_err();
    assert!(message(&err).contains("no PEM certificate"), "{err:#}");

    let err = check_tls(&connection(&["--tls-cert", bad, "--tls-key", key_path])).unwrap_err();
    assert!(message(&err).contains("--tls-cert"), "{err:#}");

    // A key file that is not a key: named, its contents not quoted.
    let secret_key = file(&format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n"));
    let err = check_tls(&connection(&[
        "--tls-cert",
        ca_path,
        "--tls-key",
        secret_key.path().to_str().unwrap(),
    ]))
    .unwrap_err();
    let text = message(&err);
    assert!(text.contains("no PEM private key"), "{text}");
    assert!(!text.contains(SECRET), "{text}");

    let err = check_tls(&connection(&["--tls-ca", "/nonexistent/ca.pem"])).unwrap_err();
    assert!(message(&err).contains("/nonexistent/ca.pem"), "{err:#}");
}
