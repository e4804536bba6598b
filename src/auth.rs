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
const SECRET_FILE: &str = "jwt-secret";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Username.
    pub sub: String,
    /// User id.
    pub uid: i64,
    pub iat: u64,
    pub exp: u64,
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

    /// `AGENTGATE_JWT_SECRET` if set, else `<data-dir>/jwt-secret`, generated
    /// on first use with mode 0600.
    pub fn load(data_dir: &Path) -> std::io::Result<Keys> {
        if let Some(secret) = std::env::var_os("AGENTGATE_JWT_SECRET").filter(|s| !s.is_empty()) {
            return Ok(Keys::new(secret.as_encoded_bytes()));
        }
        let path = data_dir.join(SECRET_FILE);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 32 => return Ok(Keys::new(&bytes)),
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is shorter than 32 bytes; delete it to generate a new one",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::getrandom(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        // create_new: if another process won the race, use its secret.
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(hex.as_bytes())?;
                f.sync_all()?;
                Ok(Keys::new(hex.as_bytes()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(Keys::new(&std::fs::read(&path)?))
            }
            Err(e) => Err(e),
        }
    }

    pub fn issue(&self, user_id: i64, username: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: username.to_string(),
            uid: user_id,
            iat: now,
            exp: now + TOKEN_LIFETIME.as_secs(),
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
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|d| d.claims)
    }
}

/// The token of a request: `?token=` first, else `Authorization: Bearer`.
pub fn request_token(req: &HttpRequest) -> Option<String> {
    let from_query = req.query_string().split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    });
    from_query.filter(|t| !t.is_empty()).or_else(|| {
        req.headers()
            .get(actix_web::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let decoded = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = decoded {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query string with any `token=` value replaced, for logs.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("token", _)) => "token=REDACTED".to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
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
        let token = keys.issue(7, "ann");
        let claims = keys.verify(&token).unwrap();
        assert_eq!((claims.uid, claims.sub.as_str()), (7, "ann"));
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
    fn query_token_is_decoded_and_redacted() {
        assert_eq!(percent_decode("a%2Eb+c"), "a.b c");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
        assert_eq!(redact_query("x=1&token=abc"), "x=1&token=REDACTED");
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("hunter22").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("hunter22", &h));
        assert!(!verify_password("hunter23", &h));
    }
}
