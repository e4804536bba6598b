//! `agentgate web-ui install`: fetches CloudCLI's built files from the npm
//! registry into `<data-dir>/web-ui/` (`dist/`, its `LICENSE`, a `VERSION`
//! file). CloudCLI is AGPL-3.0, so agentgate never bundles it: this command
//! runs `npm pack` and `tar` on the user's machine.
//!
//! The new copy is unpacked into a staging folder beside the old one and
//! swapped in by renames, so a running gateway serves either the old or the
//! new build, never half of one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{CLOUDCLI_PACKAGE, INSTALL_DIR};

/// Fetches `@cloudcli-ai/cloudcli@version` and installs its `dist/`;
/// returns the folder `serve` will serve.
pub fn install(data_dir: &Path, version: &str) -> std::io::Result<PathBuf> {
    let valid_version = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'));
    if !valid_version {
        return Err(std::io::Error::other(format!(
            "invalid version '{version}' (expected e.g. 1.37.2)"
        )));
    }
    crate::files::ensure_private_dir(data_dir)?;
    let target = data_dir.join(INSTALL_DIR);
    let staging = data_dir.join(format!("{INSTALL_DIR}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let result = fetch_into(&staging, version).and_then(|out| swap_in(&out, &target));
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target.join("dist"))
}

/// `npm pack` + `tar` into `staging/out/{dist,LICENSE,VERSION}`.
fn fetch_into(staging: &Path, version: &str) -> std::io::Result<PathBuf> {
    let spec = format!("{CLOUDCLI_PACKAGE}@{version}");
    eprintln!("fetching {spec} from the npm registry (AGPL-3.0; not part of agentgate) ...");
    run(
        Command::new("npm")
            .args(["pack", &spec, "--silent", "--no-audit", "--no-fund"])
            .current_dir(staging),
        "npm (Node.js) is needed to fetch the web UI",
    )?;
    let tarball = std::fs::read_dir(staging)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .ok_or_else(|| std::io::Error::other("npm pack produced no .tgz file"))?;
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(staging)
            .args(["package/dist", "package/LICENSE"]),
        "tar is needed to unpack the web UI",
    )?;
    let package = staging.join("package");
    if !package.join("dist/index.html").is_file() {
        return Err(std::io::Error::other(format!(
            "{spec} has no dist/index.html; is it a CloudCLI release?"
        )));
    }
    let out = staging.join("out");
    std::fs::create_dir_all(&out)?;
    std::fs::rename(package.join("dist"), out.join("dist"))?;
    std::fs::rename(package.join("LICENSE"), out.join("LICENSE"))?;
    std::fs::write(out.join("VERSION"), format!("{spec}\n"))?;
    Ok(out)
}

/// Replaces `target` by `out` with renames (the old copy is removed after).
fn swap_in(out: &Path, target: &Path) -> std::io::Result<()> {
    let old = target.with_file_name(format!("{INSTALL_DIR}.old-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(target, &old)?;
    }
    if let Err(err) = std::fs::rename(out, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        return Err(err);
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn run(cmd: &mut Command, missing: &str) -> std::io::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| std::io::Error::other(format!("cannot run {program}: {e} ({missing})")))?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_that_is_not_one_is_refused_before_npm_runs() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "1.0 && rm -rf /", "--registry=http://x", "../x"] {
            let err = install(dir.path(), bad).unwrap_err();
            assert!(err.to_string().contains("invalid version"), "{bad}: {err}");
        }
        assert!(!dir.path().join(INSTALL_DIR).exists());
    }

    #[test]
    fn swap_in_replaces_an_old_copy() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(INSTALL_DIR);
        std::fs::create_dir_all(target.join("dist")).unwrap();
        std::fs::write(target.join("dist/index.html"), "old").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("dist")).unwrap();
        std::fs::write(out.join("dist/index.html"), "new").unwrap();
        swap_in(&out, &target).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("dist/index.html")).unwrap(),
            "new"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, [std::ffi::OsString::from(INSTALL_DIR)]);
    }
}
