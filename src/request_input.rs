//! What a request carries from the client, read without actix: the token of
//! `?token=` or `Authorization: Bearer`, the query as it may be logged, and
//! the JSON bodies of the REST routes. Kept free of the server's types so
//! the fuzz crate can include this file as it is (`fuzz/fuzz_targets/
//! request_input.rs`); the handlers add their checks in their own modules.

use serde::Deserialize;

/// The raw (still percent-encoded) value of the first `key=` in a query.
pub fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// The token of a request: `?token=` first, else `Authorization: Bearer`.
pub fn token_from(query: &str, authorization: Option<&[u8]>) -> Option<String> {
    let from_query = query_value(query, "token").map(percent_decode);
    from_query.filter(|t| !t.is_empty()).or_else(|| {
        std::str::from_utf8(authorization?)
            .ok()?
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

/// A query value as browsers encode it: `+` is a space, `%XX` a byte (an
/// invalid escape stays as it is), bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
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

/// `POST /api/auth/login` and `/register`.
#[derive(Debug, Deserialize)]
pub struct Credentials {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
}

/// `POST /api/providers/sessions`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSession {
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub project_path: Option<String>,
    #[serde(default)]
    pub initial_message: Option<String>,
}

/// `POST /api/projects/create-project`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewProject {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub custom_name: Option<String>,
}

/// `PUT /api/projects/{id}/rename`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rename {
    #[serde(default)]
    pub display_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_token_is_decoded_and_redacted() {
        assert_eq!(percent_decode("a%2Eb+c"), "a.b c");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
        assert_eq!(redact_query("x=1&token=abc"), "x=1&token=REDACTED");
    }

    #[test]
    fn query_values_are_found_by_whole_key_first_one_wins() {
        let q = "x_from_sequence_num=1&from_sequence_num=42&from_sequence_num=7";
        assert_eq!(query_value(q, "from_sequence_num"), Some("42"));
        assert_eq!(query_value(q, "token"), None);
        assert_eq!(query_value("token", "token"), None);
    }

    #[test]
    fn the_query_wins_and_an_empty_token_is_none() {
        let bearer = Some(&b"Bearer  hdr "[..]);
        assert_eq!(
            token_from("a=1&token=q%20t", bearer).as_deref(),
            Some("q t")
        );
        assert_eq!(token_from("token=", bearer).as_deref(), Some("hdr"));
        assert_eq!(token_from("", Some(b"Basic abc")), None);
        assert_eq!(token_from("", Some(b"Bearer \xff")), None);
        assert_eq!(token_from("", Some(b"Bearer   ")), None);
    }
}
