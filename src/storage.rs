//! The storage directory (`storage.dir`): one bridge per directory, readable by the
//! owner only.
//!
//! One bridge per directory: before anything else starts, the bridge takes an exclusive
//! OS lock (`flock`) on [`LOCK_FILE`] in the directory and holds it until it ends. A
//! second process on the same directory gets [`StorageError::Locked`] at once (the
//! binary exits with 73); the first one is not disturbed. The lock is the kernel's: it
//! goes with the process however it ends (`kill -9` included), so a stale lock file
//! never blocks a restart. The file holds the owner's pid, for the error message only.
//!
//! Permissions do not depend on the umask: the directory is made 0700 and every file the
//! bridge keeps in it 0600, including files left by an older version (fixed at start).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

/// The lock file in `storage.dir`.
pub const LOCK_FILE: &str = "bvcsp2mqtt.lock";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "storage.dir {dir}: another bvcsp2mqtt is already running on this directory{holder}; only one bridge may use a storage directory"
    )]
    Locked { dir: String, holder: String },
    #[error("storage.dir {dir}: {what}")]
    Io {
        dir: String,
        what: String,
        source: std::io::Error,
    },
}

/// The held lock on a storage directory; released when dropped (or the process ends).
#[derive(Debug)]
pub struct StorageLock {
    _file: File,
    dir: PathBuf,
}

impl StorageLock {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Create `dir` if needed, make it and its files owner-only, and take its lock.
pub fn lock(dir: &Path) -> Result<StorageLock, StorageError> {
    let io = |what: &str, source: std::io::Error| StorageError::Io {
        dir: dir.display().to_string(),
        what: what.to_string(),
        source,
    };
    create_private_dir(dir).map_err(|e| io("cannot create it", e))?;
    let path = dir.join(LOCK_FILE);
    let mut file = private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io(&format!("cannot open {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!(" (pid {pid})"),
                Err(_) => String::new(),
            };
            return Err(StorageError::Locked {
                dir: dir.display().to_string(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io(&format!("cannot lock {}", path.display()), e));
        }
    }
    // Informational only: the lock, not the content, is what counts.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    make_files_private(dir);
    Ok(StorageLock {
        _file: file,
        dir: dir.to_path_buf(),
    })
}

/// `dir` (and any missing parent) created 0700; an existing `dir` is made 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode != 0o700
            && let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        {
            warn!(
                "storage.dir {}: cannot make it owner-only (mode {mode:o}): {e}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Options that create a file 0600 (the umask can only take bits away; see
/// [`make_private`] for making sure).
pub fn private_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Make an open file 0600, whatever the umask did to it.
pub fn make_private(file: &File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if file.metadata()?.permissions().mode() & 0o777 != 0o600 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// Create `path` 0600 if it does not exist, and make it 0600 if it does.
pub fn ensure_private_file(path: &Path) -> std::io::Result<()> {
    let f = private_options().write(true).create(true).open(path)?;
    make_private(&f)
}

/// Every regular file directly in `dir` made 0600 (left by an older version, or created
/// under a lax umask). Failures are logged, not fatal.
fn make_files_private(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // symlink_metadata: never follow a link out of the directory.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_file()
                && meta.permissions().mode() & 0o777 != 0o600
                && let Err(e) =
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            {
                warn!("cannot make {} owner-only: {e}", path.display());
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Move a damaged `path` aside as `<name>.corrupt-<unix time>` (with its SQLite `-wal`
/// and `-journal` files, if any; the `-shm` index is only removed, it holds no data), so
/// that a fresh one can start. Returns where it went. Nothing is deleted.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let with = |p: &Path, suffix: &str| {
        let mut s = p.as_os_str().to_os_string();
        s.push(suffix);
        PathBuf::from(s)
    };
    let mut aside = path.with_file_name(format!("{name}.corrupt-{now}"));
    let mut n = 1;
    while aside.exists() || with(&aside, "-wal").exists() {
        aside = path.with_file_name(format!("{name}.corrupt-{now}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-journal"] {
        let side = with(path, suffix);
        if side.exists() {
            std::fs::rename(&side, with(&aside, suffix))?;
        }
    }
    let shm = with(path, "-shm");
    if shm.exists() {
        std::fs::remove_file(&shm)?;
    }
    Ok(aside)
}

/// Write `bytes` to `path` as a whole or not at all, readable by the owner only.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        make_private(&f)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = lock(&state).unwrap();
        match lock(&state) {
            Err(StorageError::Locked { dir, holder }) => {
                assert_eq!(dir, state.display().to_string());
                assert_eq!(holder, format!(" (pid {})", std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        let text = lock(&state).unwrap_err().to_string();
        assert!(text.contains("storage.dir") && text.contains(&state.display().to_string()));
        drop(first);
        let _again = lock(&state).expect("free again once the first is dropped");
    }

    #[cfg(unix)]
    #[test]
    fn the_dir_and_its_files_become_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let old = state.join("playbox-old.pin");
        std::fs::write(&old, "x").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o666)).unwrap();
        let _lock = lock(&state).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&old), 0o600);
        assert_eq!(mode(&state.join(LOCK_FILE)), 0o600);
        write_atomic(&state.join("f.json"), b"{}").unwrap();
        assert_eq!(mode(&state.join("f.json")), 0o600);
    }
}
