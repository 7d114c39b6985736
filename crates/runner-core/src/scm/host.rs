//! https URLs as the SCM code takes them: no other scheme, no credentials,
//! and the host they name (`name` or `name:port`, lowercase, no 443).

use url::Url;

/// Why a URL was refused. Never echoes the URL: it may carry credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// It does not parse; the parse error never quotes the input.
    #[error("not a valid URL: {0}")]
    NotAUrl(url::ParseError),
    /// Its scheme is not https.
    #[error("scheme {0:?} is not supported, use https")]
    Scheme(String),
    /// It has a user name or password.
    #[error("the URL must not contain credentials")]
    Credentials,
    /// It names no host.
    #[error("the URL has no host")]
    NoHost,
}

/// The host (`name` or `name:port`, lowercase, port omitted when 443) of an
/// https URL; the error names the problem and never echoes credentials.
pub fn host_of(url: &str) -> Result<String, UrlError> {
    host_port(&parse_https(url)?)
}

/// Parses `url`, which must be https without userinfo.
pub(super) fn parse_https(url: &str) -> Result<Url, UrlError> {
    let parsed = Url::parse(url).map_err(UrlError::NotAUrl)?;
    if parsed.scheme() != "https" {
        return Err(UrlError::Scheme(parsed.scheme().to_owned()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Credentials);
    }
    Ok(parsed)
}

/// `name` or `name:port`; Url already lowercases the name and drops 443.
pub(super) fn host_port(url: &Url) -> Result<String, UrlError> {
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or(UrlError::NoHost)?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_lowercases_and_keeps_only_non_default_ports() {
        assert_eq!(
            host_of("https://GitHub.COM/acme/api").unwrap(),
            "github.com"
        );
        assert_eq!(
            host_of("https://github.com:443/acme").unwrap(),
            "github.com"
        );
        assert_eq!(
            host_of("https://ghe.example:8443/").unwrap(),
            "ghe.example:8443"
        );
        assert_eq!(host_of("https://127.0.0.1:8443").unwrap(), "127.0.0.1:8443");
        assert_eq!(host_of("https://[::1]:9000/x").unwrap(), "[::1]:9000");
    }

    #[test]
    fn host_of_rejects_other_schemes() {
        let err = host_of("http://github.com/acme").unwrap_err();
        assert_eq!(err, UrlError::Scheme("http".to_owned()));
        assert_eq!(
            err.to_string(),
            r#"scheme "http" is not supported, use https"#
        );
        let err = host_of("ssh://git@github.com/acme/api.git")
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#""ssh""#), "{err}");
        assert!(!err.contains("git@"), "{err}");
    }

    #[test]
    fn host_of_rejects_credentials_without_echoing_them() {
        for url in [
            "https://ghp_secret123@github.com/acme/api",
            "https://user:ghp_secret123@github.com/acme/api",
            "https://:ghp_secret123@github.com/",
        ] {
            let err = host_of(url).unwrap_err();
            assert_eq!(err, UrlError::Credentials);
            let err = err.to_string();
            assert!(err.contains("must not contain credentials"), "{err}");
            assert!(!err.contains("ghp_secret123"), "{err}");
            assert!(!err.contains("user"), "{err}");
        }
    }

    #[test]
    fn host_of_rejects_garbage() {
        let err = host_of("github.com/acme").unwrap_err();
        assert!(matches!(err, UrlError::NotAUrl(_)), "{err:?}");
        assert!(err.to_string().starts_with("not a valid URL"), "{err}");
        assert!(host_of("").is_err());
    }
}
