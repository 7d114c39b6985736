//! Opening sealed tokens (`store_host_token.sealed_token`) on arbitrary
//! input, through `runner_core::sealed::open`, the function the runner
//! calls.
//!
//! It must never panic, and:
//! - bytes that are not a sealed box to the runner's key never open (raw
//!   input, a real box truncated or with a flipped bit, a box to another key);
//! - a real box opens exactly when its plaintext is the bound form for the
//!   principal, host and purpose asked for, with a usable secret (1 to 4096
//!   bytes once trimmed, no whitespace or control characters), and then to
//!   the trimmed secret; a box for another principal, host or purpose, or a
//!   bare token, never opens;
//! - an error names `sealed_token` and never holds the secret.

#![no_main]

use crypto_box::aead::rand_core::{CryptoRng, Error, RngCore};
use crypto_box::{PublicKey, SecretKey};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use runner_core::sealed::{Binding, MAX_SECRET_LEN, Purpose, open};
use secrecy::ExposeSecret as _;

#[derive(Debug, Arbitrary)]
enum Input {
    /// Raw bytes handed over as a sealed box.
    Raw(Vec<u8>),
    /// A real box around `plaintext`, maybe damaged.
    Sealed {
        plaintext: Plaintext,
        seed: u64,
        damage: Damage,
    },
}

#[derive(Debug, Arbitrary)]
enum Plaintext {
    /// Any bytes (a bare token among them).
    Bytes(Vec<u8>),
    /// The bound form, for what the runner asks or for something else.
    Bound {
        secret: String,
        principal: String,
        host: String,
        client_secret: bool,
        claim: Claim,
    },
}

/// What the runner asks the box to be for, against what it was sealed for.
#[derive(Debug, Arbitrary)]
enum Claim {
    Same,
    OtherPrincipal,
    OtherHost,
}

const PRINCIPAL: &str = "alice";
const HOST: &str = "github.com";

fn asked() -> Binding<'static> {
    Binding {
        purpose: Purpose::Pat,
        principal: PRINCIPAL,
        host: HOST,
    }
}

impl Plaintext {
    /// The bytes to seal, the secret inside, and whether the box is bound
    /// to exactly what the runner asks for.
    fn bytes(&self) -> (Vec<u8>, Option<&str>, bool) {
        match self {
            Self::Bytes(bytes) => (bytes.clone(), None, false),
            Self::Bound {
                secret,
                principal,
                host,
                client_secret,
                claim,
            } => {
                let (principal, host) = match claim {
                    Claim::Same => (PRINCIPAL, HOST),
                    Claim::OtherPrincipal => (principal.as_str(), HOST),
                    Claim::OtherHost => (PRINCIPAL, host.as_str()),
                };
                let purpose = if *client_secret {
                    "oauth-client-secret"
                } else {
                    "pat"
                };
                let json = serde_json::json!({
                    "v": 1,
                    "purpose": purpose,
                    "principal": principal,
                    "host": host,
                    "secret": secret,
                });
                let bound = principal == PRINCIPAL && host == HOST && !client_secret;
                (json.to_string().into_bytes(), Some(secret.as_str()), bound)
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Damage {
    None,
    Truncate(u16),
    FlipBit(u16),
    Append(Vec<u8>),
    OtherKey,
}

/// A deterministic generator, so that a crash replays; sealing needs
/// randomness only for the ephemeral key, which is not what is tested.
struct Seeded(u64);

impl RngCore for Seeded {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for Seeded {}

fn key(byte: u8) -> SecretKey {
    SecretKey::from([byte; 32])
}

fn seal(to: &PublicKey, plaintext: &[u8], seed: u64) -> Vec<u8> {
    to.seal(&mut Seeded(seed), plaintext)
        .expect("sealing to a valid key works")
}

/// What the runner should make of an intact box around `plaintext`.
fn expected(secret: Option<&str>, bound: bool) -> Option<&str> {
    let text = secret?.trim();
    let usable = bound
        && !text.is_empty()
        && text.len() <= MAX_SECRET_LEN
        && !text.chars().any(|c| c.is_whitespace() || c.is_control());
    usable.then_some(text)
}

fn refused(key: &SecretKey, sealed: &[u8], plaintext: Option<&[u8]>) -> String {
    let err = match open(key, sealed, asked()) {
        Ok(_) => panic!("opened a box that is not one to this key"),
        Err(err) => err.to_string(),
    };
    assert!(err.starts_with("sealed_token: "), "{err}");
    assert!(err.contains("does not open"), "{err}");
    if let Some(plaintext) = plaintext {
        no_plaintext(&err, plaintext);
    }
    err
}

fn no_plaintext(err: &str, plaintext: &[u8]) {
    if let Ok(text) = std::str::from_utf8(plaintext) {
        let text = text.trim();
        // Short texts may be words of the message itself.
        if text.len() >= 16 {
            assert!(!err.contains(text), "{err:?} holds the plaintext");
        }
    }
}

fuzz_target!(|input: Input| {
    let runner = key(7);
    match input {
        Input::Raw(bytes) => {
            refused(&runner, &bytes, None);
        }
        Input::Sealed {
            plaintext,
            seed,
            damage,
        } => {
            let (plaintext, secret, bound) = plaintext.bytes();
            let sealed = seal(&runner.public_key(), &plaintext, seed);
            match damage {
                Damage::None => match (open(&runner, &sealed, asked()), expected(secret, bound)) {
                    (Ok(token), Some(text)) => assert_eq!(token.expose_secret(), text),
                    (Err(err), None) => {
                        let err = err.to_string();
                        assert!(err.starts_with("sealed_token: "), "{err}");
                        assert!(!err.contains("does not open"), "{err}");
                        if let Some(secret) = secret {
                            no_plaintext(&err, secret.as_bytes());
                        }
                    }
                    (Ok(_), None) => panic!("accepted an unusable token"),
                    (Err(err), Some(_)) => panic!("refused a usable token: {err}"),
                },
                Damage::Truncate(at) => {
                    let at = usize::from(at) % sealed.len();
                    refused(&runner, &sealed[..at], Some(&plaintext));
                }
                Damage::FlipBit(bit) => {
                    let bit = usize::from(bit) % (sealed.len() * 8);
                    let mut flipped = sealed.clone();
                    flipped[bit / 8] ^= 1 << (bit % 8);
                    refused(&runner, &flipped, Some(&plaintext));
                }
                Damage::Append(extra) if !extra.is_empty() => {
                    let mut longer = sealed.clone();
                    longer.extend_from_slice(&extra);
                    refused(&runner, &longer, Some(&plaintext));
                }
                Damage::Append(_) => {}
                Damage::OtherKey => {
                    let other = seal(&key(9).public_key(), &plaintext, seed);
                    refused(&runner, &other, Some(&plaintext));
                }
            }
        }
    }
});
