//! Plugin discovery: `<data-dir>/plugins/<name>/manifest.json` (PROTOCOL.md
//! section 6). Plain functions, no actor: the [`PluginRegistry`] calls
//! [`discover`] once when it starts.
//!
//! A manifest is `{"name", "server", "args"?, "enabled"?}`; unknown fields are
//! ignored (plugins may carry UI metadata there). A folder whose manifest is
//! missing or invalid is skipped with one log line saying why; it never stops
//! the gateway or hides the other plugins.
//!
//! [`PluginRegistry`]: super::plugin_registry::PluginRegistry

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// Folder below the data dir that holds one folder per plugin.
pub const PLUGINS_DIR: &str = "plugins";
/// File name of a plugin's manifest inside its folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Largest manifest read; a bigger file is refused instead of buffered.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Longest plugin name accepted (a name is also a folder and a URL segment).
pub const MAX_NAME_LEN: usize = 64;
/// Most folders looked at in one discovery, so a huge directory cannot stall startup.
pub const MAX_PLUGINS: usize = 256;

/// Whether `name` is a valid plugin name: `^[a-zA-Z0-9_-]+$` (PROTOCOL.md
/// section 6), at most [`MAX_NAME_LEN`] bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A validated manifest, with the folder it was found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginManifest {
    /// The plugin name; equal to its folder name.
    pub name: String,
    /// The plugin folder (absolute when the data dir is); the server runs here.
    pub dir: PathBuf,
    /// The server executable, relative to `dir`, without `..` components.
    pub server: PathBuf,
    /// Arguments for the server.
    pub args: Vec<String>,
    /// Disabled plugins are listed but never started.
    pub enabled: bool,
}

impl PluginManifest {
    /// The server path inside the plugin folder.
    pub fn server_path(&self) -> PathBuf {
        self.dir.join(&self.server)
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// The folder has no `manifest.json` (or it cannot be read).
    Unreadable(String),
    /// The file is larger than [`MAX_MANIFEST_BYTES`].
    TooLarge(u64),
    /// Not JSON, or a field has the wrong type.
    InvalidJson(String),
    /// `name` is not `^[a-zA-Z0-9_-]+$` or too long.
    InvalidName(String),
    /// `name` differs from the folder name.
    NameMismatch { name: String, folder: String },
    /// `server` is empty, absolute, or leaves the plugin folder.
    InvalidServer(String),
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Unreadable(e) => write!(f, "cannot read {MANIFEST_FILE}: {e}"),
            ManifestError::TooLarge(n) => {
                write!(
                    f,
                    "{MANIFEST_FILE} is {n} bytes, more than {MAX_MANIFEST_BYTES}"
                )
            }
            ManifestError::InvalidJson(e) => write!(f, "invalid {MANIFEST_FILE}: {e}"),
            ManifestError::InvalidName(n) => {
                write!(f, "invalid plugin name {n:?}: must match ^[a-zA-Z0-9_-]+$")
            }
            ManifestError::NameMismatch { name, folder } => {
                write!(
                    f,
                    "manifest name {name:?} differs from its folder {folder:?}"
                )
            }
            ManifestError::InvalidServer(s) => write!(
                f,
                "invalid server {s:?}: must be a relative path inside the plugin folder, without .."
            ),
        }
    }
}

impl std::error::Error for ManifestError {}

/// The JSON shape; validated into [`PluginManifest`].
#[derive(Deserialize)]
struct RawManifest {
    name: String,
    server: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default = "enabled_default")]
    enabled: bool,
}

fn enabled_default() -> bool {
    true
}

/// Validates manifest text found in `dir` (whose last component is the folder name).
pub fn parse_manifest(dir: &Path, text: &str) -> Result<PluginManifest, ManifestError> {
    let raw: RawManifest =
        serde_json::from_str(text).map_err(|e| ManifestError::InvalidJson(e.to_string()))?;
    if !valid_name(&raw.name) {
        return Err(ManifestError::InvalidName(raw.name));
    }
    let folder = dir
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if folder != raw.name {
        return Err(ManifestError::NameMismatch {
            name: raw.name,
            folder,
        });
    }
    let server = PathBuf::from(&raw.server);
    let inside = !raw.server.is_empty()
        && server
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && server
            .components()
            .any(|c| matches!(c, Component::Normal(_)));
    if !inside {
        return Err(ManifestError::InvalidServer(raw.server));
    }
    Ok(PluginManifest {
        name: raw.name,
        dir: dir.to_path_buf(),
        server,
        args: raw.args,
        enabled: raw.enabled,
    })
}

/// Reads and validates `<dir>/manifest.json`.
pub fn load_manifest(dir: &Path) -> Result<PluginManifest, ManifestError> {
    let path = dir.join(MANIFEST_FILE);
    let len = std::fs::metadata(&path)
        .map_err(|e| ManifestError::Unreadable(e.to_string()))?
        .len();
    if len > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(len));
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| ManifestError::Unreadable(e.to_string()))?;
    parse_manifest(dir, &text)
}

/// Scans `<data_dir>/plugins/*/manifest.json`, returns the valid manifests
/// sorted by name, and logs every skipped folder with its reason. A missing
/// plugins folder means no plugins.
pub fn discover(data_dir: &Path) -> Vec<PluginManifest> {
    let root = data_dir.join(PLUGINS_DIR);
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            tracing::warn!(dir = %root.display(), error = %err, "cannot read the plugins folder; no plugins started");
            return Vec::new();
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .take(MAX_PLUGINS)
        .collect();
    dirs.sort();
    let mut manifests: Vec<PluginManifest> = Vec::new();
    for dir in dirs {
        match load_manifest(&dir) {
            Ok(m) => manifests.push(m),
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "skipping plugin with an invalid manifest")
            }
        }
    }
    manifests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        PathBuf::from("/data/plugins").join(name)
    }

    #[test]
    fn names_follow_the_protocol_rule() {
        assert!(valid_name("echo"));
        assert!(valid_name("My_plugin-2"));
        for bad in [
            "",
            "a b",
            "a/b",
            "..",
            "a.b",
            "é",
            "x?y",
            &"a".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(!valid_name(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_full_manifest_parses_with_defaults() {
        let m = parse_manifest(&dir("echo"), r#"{"name":"echo","server":"bin/server"}"#).unwrap();
        assert_eq!(m.name, "echo");
        assert_eq!(m.server, PathBuf::from("bin/server"));
        assert!(m.args.is_empty());
        assert!(m.enabled);
        assert_eq!(
            m.server_path(),
            PathBuf::from("/data/plugins/echo/bin/server")
        );

        let m = parse_manifest(
            &dir("echo"),
            r#"{"name":"echo","server":"./run.sh","args":["--x","1"],"enabled":false,"displayName":"Echo"}"#,
        )
        .unwrap();
        assert_eq!(m.args, vec!["--x".to_string(), "1".to_string()]);
        assert!(!m.enabled);
    }

    #[test]
    fn bad_manifests_are_refused_with_a_reason() {
        let cases = [
            ("not json", "invalid manifest.json"),
            (r#"{"server":"run"}"#, "invalid manifest.json"),
            (r#"{"name":"echo"}"#, "invalid manifest.json"),
            (
                r#"{"name":"echo","server":"run","args":"x"}"#,
                "invalid manifest.json",
            ),
            (
                r#"{"name":"echo","server":"run","enabled":"yes"}"#,
                "invalid manifest.json",
            ),
            (r#"{"name":"ec ho","server":"run"}"#, "invalid plugin name"),
            (
                r#"{"name":"other","server":"run"}"#,
                "differs from its folder",
            ),
            (r#"{"name":"echo","server":""}"#, "invalid server"),
            (r#"{"name":"echo","server":"."}"#, "invalid server"),
            (r#"{"name":"echo","server":"/bin/sh"}"#, "invalid server"),
            (r#"{"name":"echo","server":"../x/run"}"#, "invalid server"),
            (
                r#"{"name":"echo","server":"bin/../../run"}"#,
                "invalid server",
            ),
        ];
        for (text, want) in cases {
            let err = parse_manifest(&dir("echo"), text).unwrap_err();
            assert!(err.to_string().contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn discovery_skips_broken_folders_and_keeps_the_rest() {
        let root = std::env::temp_dir().join(format!("agentgate-manifest-{}", std::process::id()));
        let plugins = root.join(PLUGINS_DIR);
        let write = |name: &str, text: Option<&str>| {
            let d = plugins.join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(text) = text {
                std::fs::write(d.join(MANIFEST_FILE), text).unwrap();
            }
        };
        write("b-good", Some(r#"{"name":"b-good","server":"run"}"#));
        write(
            "a-good",
            Some(r#"{"name":"a-good","server":"run","enabled":false}"#),
        );
        write("broken", Some("{"));
        write("empty", None);
        write("huge", Some(&" ".repeat(MAX_MANIFEST_BYTES as usize + 1)));
        std::fs::write(plugins.join("stray-file"), "x").unwrap();

        let found = discover(&root);
        let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a-good", "b-good"]);
        assert!(discover(&root.join("nowhere")).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
