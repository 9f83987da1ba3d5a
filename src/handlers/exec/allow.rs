//! What `exec` is told at start, checked before the node serves anything:
//! the allow list (`--exec-allow`: each entry an absolute path to an
//! existing executable file), the names of the variables passed on
//! (`--exec-env`) and the output limits. The check follows symlinks, and
//! so does every start of the program: allow-listing a symlink trusts
//! whatever it points to, now and after it is changed.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::group::RUN_VAR;

/// Why `exec`'s settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ExecConfigError {
    /// An `--exec-allow` entry is empty.
    #[error("--exec-allow: an entry is empty (write the absolute path of a program)")]
    EmptyEntry,
    /// An `--exec-allow` entry is a bare name or a relative path.
    #[error("--exec-allow {0:?}: not an absolute path (write the program's full path, e.g. /usr/bin/name)")]
    NotAbsolute(String),
    /// An `--exec-allow` entry names nothing.
    #[error("--exec-allow {0:?}: no such file")]
    Missing(String),
    /// An `--exec-allow` entry could not be inspected.
    #[error("--exec-allow {entry:?}: cannot inspect it")]
    Unreadable {
        /// The entry.
        entry: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An `--exec-allow` entry is a directory or a device, not a program.
    #[error("--exec-allow {0:?}: not a regular file")]
    NotAFile(String),
    /// An `--exec-allow` entry has no execute permission bit.
    #[error("--exec-allow {0:?}: not executable (no execute permission)")]
    NotExecutable(String),
    /// An `--exec-env` name no variable can have, or the run tag's.
    #[error("--exec-env {0:?}: not a variable name that may be passed on (non-empty, no `=` or NUL, not {RUN_VAR})")]
    EnvName(String),
    /// `--exec-max-line` or `--exec-max-output` is 0.
    #[error("--exec-max-line and --exec-max-output must be at least 1 byte")]
    ZeroLimit,
}

/// Checks every allow-list entry; the error names the first bad one.
pub fn check_allow_list(entries: &[String]) -> Result<(), ExecConfigError> {
    entries.iter().try_for_each(|e| check_entry(e))
}

/// An absolute path to an existing file with an execute bit, symlinks
/// followed.
fn check_entry(entry: &str) -> Result<(), ExecConfigError> {
    if entry.is_empty() {
        return Err(ExecConfigError::EmptyEntry);
    }
    if !Path::new(entry).is_absolute() {
        return Err(ExecConfigError::NotAbsolute(entry.to_owned()));
    }
    let meta = std::fs::metadata(entry).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ExecConfigError::Missing(entry.to_owned()),
        _ => ExecConfigError::Unreadable {
            entry: entry.to_owned(),
            source: e,
        },
    })?;
    if !meta.is_file() {
        return Err(ExecConfigError::NotAFile(entry.to_owned()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(ExecConfigError::NotExecutable(entry.to_owned()));
    }
    Ok(())
}

/// A name `--exec-env` may pass on.
pub fn check_env_name(name: &str) -> Result<(), ExecConfigError> {
    if name.is_empty() || name.contains(['=', '\0']) || name == RUN_VAR {
        return Err(ExecConfigError::EnvName(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn write(path: &Path, mode: u32) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn only_absolute_paths_to_existing_executables_pass() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        write(&prog, 0o755);
        let plain = dir.path().join("plain");
        write(&plain, 0o644);
        let link = dir.path().join("link");
        symlink(&prog, &link).unwrap();
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_owned();

        assert!(check_allow_list(&[s(&prog), s(&link)]).is_ok());
        assert!(check_allow_list(&[]).is_ok());
        let refused = |entry: String| check_allow_list(&[s(&prog), entry]).unwrap_err();
        assert!(matches!(
            refused(String::new()),
            ExecConfigError::EmptyEntry
        ));
        assert!(matches!(refused("echo".into()), ExecConfigError::NotAbsolute(e) if e == "echo"));
        assert!(matches!(
            refused("./prog".into()),
            ExecConfigError::NotAbsolute(_)
        ));
        assert!(matches!(
            refused(s(&dir.path().join("none"))),
            ExecConfigError::Missing(_)
        ));
        assert!(matches!(refused(s(&dangling)), ExecConfigError::Missing(_)));
        assert!(matches!(
            refused(s(dir.path())),
            ExecConfigError::NotAFile(_)
        ));
        assert!(matches!(
            refused(s(&plain)),
            ExecConfigError::NotExecutable(_)
        ));
        // The message names the entry.
        let text = refused("./prog".into()).to_string();
        assert!(
            text.contains("\"./prog\"") && text.contains("--exec-allow"),
            "{text}"
        );
    }

    #[test]
    fn env_names_are_checked() {
        assert!(check_env_name("HOME").is_ok());
        for bad in ["", "A=B", "A\0", RUN_VAR] {
            assert!(check_env_name(bad).is_err(), "{bad:?}");
        }
    }
}
