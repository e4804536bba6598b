//! Authentication: HS256 JWTs, the JWT secret, password hashes, and the
//! token lookup for upgrades and REST calls (PROTOCOL.md section 3).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// How long an issued token is valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Bytes of a generated secret (PROTOCOL.md asks for 32+).
const SECRET_BYTES: usize = 48;
/// Shortest secret accepted, from the environment or the file.
pub const MIN_SECRET_BYTES: usize = 32;
pub const SECRET_FILE: &str = "jwt-secret";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Username.
    pub sub: String,
    /// User id.
    pub uid: i64,
    pub iat: u64,
    pub exp: u64,
    /// The user's token version at issue; older than the current one means
    /// revoked. Tokens from before revocation existed carry none (0).
    #[serde(default)]
    pub ver: i32,
}

/// Signs and checks tokens.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    pub fn new(secret: &[u8]) -> Keys {
        Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// `AGENTGATE_JWT_SECRET` if set (at least 32 bytes), else
    /// `<data-dir>/jwt-secret`, generated on first use with mode 0600.
    ///
    /// The file is written whole to a temporary name and then linked into
    /// place, so no reader ever sees a half-written secret, and two processes
    /// starting at once agree on one. A file shorter than 32 bytes (left by a
    /// crash of an older version) is replaced, with a warning.
    pub fn load(data_dir: &Path) -> std::io::Result<Keys> {
        if let Some(secret) = std::env::var_os("AGENTGATE_JWT_SECRET").filter(|s| !s.is_empty()) {
            let len = secret.as_encoded_bytes().len();
            if len < MIN_SECRET_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("AGENTGATE_JWT_SECRET is {len} bytes; at least {MIN_SECRET_BYTES} are required (e.g. `openssl rand -hex 32`)"),
                ));
            }
            return Ok(Keys::new(secret.as_encoded_bytes()));
        }
        Keys::load_file(data_dir)
    }

    /// The secret of `<data-dir>/jwt-secret` (see [`Keys::load`]).
    fn load_file(data_dir: &Path) -> std::io::Result<Keys> {
        let path = data_dir.join(SECRET_FILE);
        // Bounded: each round either returns or found a file another process
        // completed (read on the next round) or removed a short one.
        for _ in 0..3 {
            match std::fs::read(&path) {
                Ok(bytes) if bytes.len() >= MIN_SECRET_BYTES => return Ok(Keys::new(&bytes)),
                Ok(bytes) => {
                    tracing::warn!(
                        path = %path.display(),
                        len = bytes.len(),
                        "JWT secret file is incomplete (shorter than {MIN_SECRET_BYTES} bytes); replacing it, earlier tokens become invalid"
                    );
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some(keys) = write_new_secret(data_dir, &path)? {
                return Ok(keys);
            }
        }
        Err(std::io::Error::other(format!(
            "{}: could not settle on a JWT secret (another process keeps replacing it)",
            path.display()
        )))
    }

    /// A token for the user at its current token `version`.
    pub fn issue(&self, user_id: i64, username: &str, version: i32) -> String {
        self.issue_for(user_id, username, version, TOKEN_LIFETIME)
    }

    /// The same, valid for `lifetime`.
    pub fn issue_for(
        &self,
        user_id: i64,
        username: &str,
        version: i32,
        lifetime: Duration,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: username.to_string(),
            uid: user_id,
            iat: now,
            exp: now.saturating_add(lifetime.as_secs()),
            ver: version,
        };
        // unwrap: HS256 signing of a plain struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing")
    }

    /// Verifies signature, algorithm (HS256 only, so `alg: none` is refused) and expiry.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()?
            .claims;
        // RFC 7519 4.1.4: not accepted *on or after* `exp` (jsonwebtoken
        // still accepts the second of `exp` itself), the moment open
        // sockets are closed.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        (claims.exp > now).then_some(claims)
    }
}

/// Writes a fresh secret to a temporary file and links it to `path`; `None`
/// when another process linked its own first (the caller reads that one).
fn write_new_secret(dir: &Path, path: &Path) -> std::io::Result<Option<Keys>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::getrandom(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(
        ".{SECRET_FILE}.{}.{}",
        std::process::id(),
        &hex[..8]
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(hex.as_bytes())?;
            f.sync_all()
        });
    // link() fails if `path` exists: the first complete file wins.
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(Some(Keys::new(hex.as_bytes())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

/// The token of a request: `?token=` first, else `Authorization: Bearer`.
pub fn request_token(req: &HttpRequest) -> Option<String> {
    let authorization = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    crate::request_input::token_from(req.query_string(), authorization)
}

pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A hash of no one's password, verified against when the user is unknown
/// (or has no password) so that the answer takes as long as for a real user.
/// Computed once; `serve` warms it at start.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password("agentgate dummy password, matches nothing")
            .unwrap_or_else(|_| "$argon2id$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string())
    })
}

/// Checks `password` against the user's hash, or against [`dummy_hash`]
/// when there is none (then always false), at the same cost either way.
pub fn verify_password_timed(password: &str, hash: Option<&str>) -> bool {
    match hash {
        Some(h) => verify_password(password, h),
        None => {
            verify_password(password, dummy_hash());
            false
        }
    }
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let keys = Keys::new(b"0123456789abcdef0123456789abcdef");
        let token = keys.issue(7, "ann", 3);
        let claims = keys.verify(&token).unwrap();
        assert_eq!((claims.uid, claims.sub.as_str(), claims.ver), (7, "ann", 3));
        let other = Keys::new(b"another-secret-another-secret-xx");
        assert!(other.verify(&token).is_none());
        assert!(keys.verify("not.a.token").is_none());
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(br#"{"sub":"ann","uid":1,"iat":1,"exp":99999999999}"#);
        let keys = Keys::new(b"0123456789abcdef0123456789abcdef");
        assert!(keys.verify(&format!("{header}.{body}.")).is_none());
    }

    #[test]
    fn env_secret_shorter_than_32_bytes_is_refused() {
        // Only this test sets the variable in this process.
        std::env::set_var("AGENTGATE_JWT_SECRET", "short-secret");
        let err = Keys::load(Path::new("/nonexistent")).err().unwrap();
        std::env::set_var("AGENTGATE_JWT_SECRET", "x".repeat(32));
        let ok = Keys::load(Path::new("/nonexistent")).is_ok();
        std::env::remove_var("AGENTGATE_JWT_SECRET");
        assert!(err.to_string().contains("at least 32"), "{err}");
        assert!(ok);
    }

    #[test]
    fn secret_file_is_made_once_and_a_half_written_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRET_FILE);
        std::fs::write(&path, "0123abcd").unwrap();
        let keys = Keys::load_file(dir.path()).unwrap();
        let secret = std::fs::read(&path).unwrap();
        assert_eq!(secret.len(), 2 * SECRET_BYTES);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The next load reads the same secret: its tokens stay valid.
        let again = Keys::load_file(dir.path()).unwrap();
        assert!(again.verify(&keys.issue(1, "a", 0)).is_some());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(SECRET_FILE)]);
    }

    #[test]
    fn unknown_users_are_verified_against_the_dummy() {
        assert!(!verify_password_timed("anything", None));
        assert!(dummy_hash().starts_with("$argon2"));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("hunter22").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("hunter22", &h));
        assert!(!verify_password("hunter23", &h));
    }
}
