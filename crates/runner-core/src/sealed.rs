//! Secrets sealed to the runner's key by a user's or admin's client (a
//! personal access token, an OAuth client secret), bound to what they are
//! for: the control plane forwards the sealed box but can neither read it
//! nor replay it for another purpose, principal or host.
//!
//! The box is a crypto_box sealed box; its plaintext is the UTF-8 JSON
//! object `{"v":1,"purpose":P,"principal":U,"host":H,"secret":S}`.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

/// Longest secret accepted from a sealed box, in bytes.
pub const MAX_SECRET_LEN: usize = 4096;

/// The only format version.
const VERSION: u32 = 1;

/// What a sealed secret is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A user's personal access token (`store_host_token.sealed_token`).
    Pat,
    /// An integration's OAuth client secret (`oauth.sealed_client_secret`);
    /// its principal is empty.
    OAuthClientSecret,
}

impl Purpose {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pat => "pat",
            Self::OAuthClientSecret => "oauth-client-secret",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Self::Pat => "sealed_token",
            Self::OAuthClientSecret => "oauth.sealed_client_secret",
        }
    }
}

/// What the box must have been sealed for.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// What it is.
    pub purpose: Purpose,
    /// The user (empty for an OAuth client secret).
    pub principal: &'a str,
    /// The SCM host, as in the integration.
    pub host: &'a str,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain {
    v: u32,
    purpose: String,
    principal: String,
    host: String,
    secret: String,
}

impl Drop for Plain {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// Why a secret could not be sealed. Never holds the secret.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The plaintext could not be written as JSON.
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    /// The sealed box could not be made.
    #[error("cannot seal the secret")]
    Seal,
}

/// Why a sealed secret was refused: the field it came in and the problem.
/// Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct OpenError {
    /// `sealed_token` or `oauth.sealed_client_secret`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: OpenProblem,
}

/// What is wrong with a sealed secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenProblem {
    /// The box does not open with the runner's key.
    #[error("does not open with this runner's key (sealed to another key, or corrupted)")]
    Unopenable,
    /// The plaintext is not the JSON form.
    #[error(
        "is not a sealed secret of format version {VERSION} (a JSON object with v, purpose, principal, host and secret)"
    )]
    NotJson,
    /// Another format version.
    #[error("format version {0} is not supported (expected {VERSION})")]
    Version(u32),
    /// Sealed for another purpose.
    #[error("was sealed as {sealed_as:?}, not as {expected:?}")]
    Purpose {
        /// The purpose in the box, made printable and short.
        sealed_as: String,
        /// The purpose expected.
        expected: &'static str,
    },
    /// Sealed for another principal.
    #[error("was sealed for another principal, not {0:?}")]
    Principal(String),
    /// Sealed for another host.
    #[error("was sealed for another host, not {0}")]
    Host(String),
    /// The secret is blank.
    #[error("the secret is empty")]
    Empty,
    /// The secret is longer than [`MAX_SECRET_LEN`].
    #[error("the secret is longer than {MAX_SECRET_LEN} bytes")]
    TooLong,
    /// The secret holds whitespace or control characters.
    #[error("the secret contains whitespace or control characters")]
    Whitespace,
}

/// Seals `secret` to the runner's X25519 public key, bound to `binding`.
pub fn seal(
    public_key: &crypto_box::PublicKey,
    binding: Binding<'_>,
    secret: &str,
) -> Result<Vec<u8>, SealError> {
    let plain = Plain {
        v: VERSION,
        purpose: binding.purpose.as_str().to_owned(),
        principal: binding.principal.to_owned(),
        host: binding.host.to_owned(),
        secret: secret.to_owned(),
    };
    let bytes = Zeroizing::new(serde_json::to_vec(&plain)?);
    public_key
        .seal(&mut crypto_box::aead::OsRng, &bytes)
        .map_err(|_| SealError::Seal)
}

/// Opens a sealed secret. It must open with `key`, be the JSON form above,
/// carry exactly `binding`, and its secret, once trimmed, be 1 to
/// [`MAX_SECRET_LEN`] bytes without whitespace or control characters. The
/// error names the field and never holds the secret; the opened bytes are
/// zeroed whatever the outcome.
pub fn open(
    key: &crypto_box::SecretKey,
    sealed: &[u8],
    binding: Binding<'_>,
) -> Result<SecretString, OpenError> {
    let refuse = |problem| OpenError {
        field: binding.purpose.field(),
        problem,
    };
    let opened = Zeroizing::new(
        key.unseal(sealed)
            .map_err(|_| refuse(OpenProblem::Unopenable))?,
    );
    let plain: Plain = serde_json::from_slice(&opened).map_err(|_| refuse(OpenProblem::NotJson))?;
    if plain.v != VERSION {
        return Err(refuse(OpenProblem::Version(plain.v)));
    }
    if plain.purpose != binding.purpose.as_str() {
        return Err(refuse(OpenProblem::Purpose {
            sealed_as: printable(&plain.purpose),
            expected: binding.purpose.as_str(),
        }));
    }
    if plain.principal != binding.principal {
        return Err(refuse(OpenProblem::Principal(binding.principal.to_owned())));
    }
    if plain.host != binding.host {
        return Err(refuse(OpenProblem::Host(binding.host.to_owned())));
    }
    let text = plain.secret.trim();
    if text.is_empty() {
        return Err(refuse(OpenProblem::Empty));
    }
    if text.len() > MAX_SECRET_LEN {
        return Err(refuse(OpenProblem::TooLong));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refuse(OpenProblem::Whitespace));
    }
    Ok(SecretString::from(text.to_owned()))
}

/// A short, printable rendering of a value that is not a secret.
fn printable(value: &str) -> String {
    value
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crypto_box::aead::OsRng;
    use secrecy::ExposeSecret as _;

    const PAT: Binding<'static> = Binding {
        purpose: Purpose::Pat,
        principal: "alice",
        host: "github.com",
    };

    fn raw(to: &crypto_box::SecretKey, plain: &[u8]) -> Vec<u8> {
        to.public_key().seal(&mut OsRng, plain).expect("seal")
    }

    #[test]
    fn opens_only_for_its_purpose_principal_and_host() {
        let key = crypto_box::SecretKey::generate(&mut OsRng);
        let good = seal(&key.public_key(), PAT, " ghp_token\n").expect("seal");
        assert_eq!(
            open(&key, &good, PAT).expect("opens").expose_secret(),
            "ghp_token"
        );
        let replays = [
            (
                Binding {
                    principal: "mallory",
                    ..PAT
                },
                "another principal",
            ),
            (
                Binding {
                    principal: "",
                    ..PAT
                },
                "another principal",
            ),
            (
                Binding {
                    host: "github.com.evil.example",
                    ..PAT
                },
                "another host",
            ),
            (
                Binding {
                    host: "GitHub.com",
                    ..PAT
                },
                "another host",
            ),
            (
                Binding {
                    purpose: Purpose::OAuthClientSecret,
                    principal: "alice",
                    ..PAT
                },
                "was sealed as \"pat\"",
            ),
        ];
        for (binding, needle) in replays {
            let err = open(&key, &good, binding).expect_err(needle).to_string();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains("ghp_"), "{err}");
        }
    }

    #[test]
    fn refuses_what_is_not_whole_and_well_formed() {
        let key = crypto_box::SecretKey::generate(&mut OsRng);
        let other = crypto_box::SecretKey::generate(&mut OsRng);
        let good = seal(&key.public_key(), PAT, "ghp_token").expect("seal");
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        let json = |secret: &str| {
            format!(
                r#"{{"v":1,"purpose":"pat","principal":"alice","host":"github.com","secret":"{secret}"}}"#
            )
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "does not open"),
            ("random", vec![0xa5; 200], "does not open"),
            ("truncated", good[..good.len() - 1].to_vec(), "does not open"),
            ("tampered", flipped, "does not open"),
            ("another key", seal(&other.public_key(), PAT, "ghp_token").expect("seal"), "does not open"),
            ("a bare token (unbound)", raw(&key, b"ghp_token"), "is not a sealed secret"),
            ("not UTF-8", raw(&key, &[0x7b, 0xff, 0xfe]), "is not a sealed secret"),
            ("unknown field", raw(&key, br#"{"v":1,"purpose":"pat","principal":"alice","host":"github.com","secret":"ghp_x","extra":1}"#), "is not a sealed secret"),
            ("version 2", raw(&key, br#"{"v":2,"purpose":"pat","principal":"alice","host":"github.com","secret":"ghp_x"}"#), "version 2 is not supported"),
            ("blank", raw(&key, json(" \\t\\n").as_bytes()), "is empty"),
            ("inner space", raw(&key, json("ghp_a b").as_bytes()), "whitespace or control"),
        ];
        for (name, sealed, needle) in cases {
            let err = open(&key, &sealed, PAT).expect_err(name).to_string();
            assert!(err.starts_with("sealed_token: "), "{name}: {err}");
            assert!(err.contains(needle), "{name}: {err}");
            assert!(!err.contains("ghp_"), "{name}: {err}");
        }
        let long = seal(&key.public_key(), PAT, &"x".repeat(MAX_SECRET_LEN + 1)).expect("seal");
        let err = open(&key, &long, PAT).expect_err("too long");
        assert_eq!(
            err,
            OpenError {
                field: "sealed_token",
                problem: OpenProblem::TooLong
            }
        );
        assert_eq!(
            err.to_string(),
            "sealed_token: the secret is longer than 4096 bytes"
        );
    }

    #[test]
    fn client_secrets_name_their_field() {
        let key = crypto_box::SecretKey::generate(&mut OsRng);
        let binding = Binding {
            purpose: Purpose::OAuthClientSecret,
            principal: "",
            host: "git.example.com",
        };
        let sealed = seal(&key.public_key(), binding, "s3cret").expect("seal");
        assert_eq!(
            open(&key, &sealed, binding).expect("opens").expose_secret(),
            "s3cret"
        );
        let err = open(
            &key,
            &sealed,
            Binding {
                host: "github.com",
                ..binding
            },
        )
        .expect_err("host")
        .to_string();
        assert!(
            err.starts_with("oauth.sealed_client_secret: was sealed for another host"),
            "{err}"
        );
    }
}
