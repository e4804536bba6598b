//! The gateway's private files: the data directory is made 0700, the JWT
//! secret, the SQLite database and its `-wal`/`-shm` files 0600, at every
//! start of every command. A looser mode found on an existing file is logged
//! as a warning and fixed. The database file is created 0600 before SQLite
//! opens it, because SQLite gives its WAL and SHM files the database's mode.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::Common;
use crate::db::Db;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Sets `mode` on `path` if group or others have any access; warns when it did.
fn tighten(path: &Path, mode: u32, what: &str) -> std::io::Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let current = meta.permissions().mode() & 0o777;
    if current & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{current:o}"),
            fixed = format!("{mode:o}"),
            "{what} was readable by other users; its mode is fixed"
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates the data directory 0700 (and its missing parents), or fixes its mode.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir, DIR_MODE, "the data directory")
}

/// The file behind a `sqlite://` URL, unless it is in memory or a URI.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    if crate::db::Backend::of(url) == crate::db::Backend::Postgres {
        return None;
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    (!path.is_empty() && path != ":memory:" && !path.starts_with("file:"))
        .then(|| PathBuf::from(path))
}

fn tighten_db_files(db: &Path) -> std::io::Result<()> {
    tighten(db, FILE_MODE, "the database")?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        tighten(Path::new(&name), FILE_MODE, "a database side file")?;
    }
    Ok(())
}

/// Makes the data directory private and opens the database with private files.
pub fn open_private(common: &Common) -> std::io::Result<Db> {
    ensure_private_dir(&common.data_dir())?;
    let url = common.database_url();
    let file = sqlite_file(&url);
    if let Some(file) = &file {
        use std::os::unix::fs::OpenOptionsExt;
        // Created here with 0600 if missing (SQLite would use the umask).
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        tighten_db_files(file)?;
    }
    let db = Db::open(&url).map_err(std::io::Error::other)?;
    if let Some(file) = &file {
        tighten_db_files(file)?;
    }
    Ok(db)
}

/// The JWT secret file, if there is one, is 0600.
pub fn check_secret_file(data_dir: &Path) {
    let path = data_dir.join(crate::auth::SECRET_FILE);
    if let Err(e) = tighten(&path, FILE_MODE, "the JWT secret") {
        tracing::error!(path = %path.display(), error = %e, "cannot fix the JWT secret's mode");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn loose_modes_are_fixed_and_new_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        let secret = data.join("jwt-secret");
        std::fs::write(&secret, "x".repeat(64)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_secret_file(&data);
        assert_eq!(mode(&secret), 0o600);
        assert_eq!(
            sqlite_file("sqlite:///a/b.db"),
            Some(PathBuf::from("/a/b.db"))
        );
        assert_eq!(sqlite_file(":memory:"), None);
    }
}
