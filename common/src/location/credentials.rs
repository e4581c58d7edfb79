//! Stored credentials: an argon2id hash for PLAIN/LOGIN and SCRAM-SHA-256 keys (RFC 5802,
//! RFC 7677), both over the SASLprep'd password (RFC 4013), so a non-ASCII password behaves the
//! same with every mechanism.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// PBKDF2 iterations for SCRAM-SHA-256 (RFC 7677 §4 asks for at least 4096).
pub const SCRAM_ITERATIONS: u32 = 4096;
/// The longest password accepted, in bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// SCRAM-SHA-256 server keys: only StoredKey and ServerKey are kept, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// The salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// H(ClientKey).
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

/// A mailbox's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The argon2id hash in PHC string form.
    pub argon2: String,
    /// The SCRAM-SHA-256 keys.
    pub scram: ScramKeys,
}

// Credentials never appear in logs.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// A password that cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Empty.
    #[error("the password is empty")]
    Empty,
    /// Longer than [`MAX_PASSWORD_LEN`].
    #[error("the password is longer than {MAX_PASSWORD_LEN} bytes")]
    TooLong,
    /// SASLprep refused it (prohibited or unassigned characters).
    #[error("the password contains characters SASLprep prohibits")]
    Prohibited,
    /// The hash could not be made.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

impl Credentials {
    /// Hashes a new password. Slow (argon2id, ~50 ms): run it off the async workers.
    pub fn from_password(password: &str) -> Result<Self, CredentialError> {
        let prepared = prepare(password)?;
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let argon2 = argon2::Argon2::default()
            .hash_password(prepared.as_bytes(), &salt)
            .map_err(|e| CredentialError::Hash(e.to_string()))?
            .to_string();
        let mut scram_salt = vec![0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut scram_salt);
        let scram = scram_keys(&prepared, &scram_salt, SCRAM_ITERATIONS)?;
        Ok(Self { argon2, scram })
    }

    /// Whether `password` matches. Slow (argon2id): run it off the async workers, with a
    /// concurrency limit.
    pub fn verify(&self, password: &str) -> bool {
        let Ok(prepared) = prepare(password) else {
            return false;
        };
        let Ok(hash) = PasswordHash::new(&self.argon2) else {
            return false;
        };
        argon2::Argon2::default()
            .verify_password(prepared.as_bytes(), &hash)
            .is_ok()
    }
}

fn prepare(password: &str) -> Result<String, CredentialError> {
    if password.is_empty() {
        return Err(CredentialError::Empty);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(CredentialError::TooLong);
    }
    let p = stringprep::saslprep(password).map_err(|_| CredentialError::Prohibited)?;
    if p.is_empty() {
        Err(CredentialError::Empty)
    } else {
        Ok(p.into_owned())
    }
}

/// Derives the SCRAM-SHA-256 keys for a (SASLprep'd) password.
pub(crate) fn scram_keys(
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<ScramKeys, CredentialError> {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2::<Hmac<Sha256>>(password.as_bytes(), salt, iterations, &mut salted)
        .map_err(|e| CredentialError::Hash(e.to_string()))?;
    let hmac = |key: &[u8], msg: &[u8]| -> Result<Vec<u8>, CredentialError> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map_err(|e| CredentialError::Hash(e.to_string()))?;
        m.update(msg);
        Ok(m.finalize().into_bytes().to_vec())
    };
    let client_key = hmac(&salted, b"Client Key")?;
    let server_key = hmac(&salted, b"Server Key")?;
    let stored_key = Sha256::digest(&client_key).to_vec();
    Ok(ScramKeys {
        salt: salt.to_vec(),
        iterations,
        stored_key,
        server_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_the_password_only() {
        let c = Credentials::from_password("correct horse").unwrap();
        assert!(c.verify("correct horse"));
        assert!(!c.verify("correct hors"));
        assert!(!c.verify(""));
        assert!(c.argon2.starts_with("$argon2id$"));
        assert_eq!(format!("{c:?}"), "Credentials(<redacted>)");
    }

    #[test]
    fn saslprep_maps_non_ascii_spaces() {
        // U+00A0 NO-BREAK SPACE maps to SPACE under SASLprep.
        let c = Credentials::from_password("pass\u{a0}word").unwrap();
        assert!(c.verify("pass word"));
    }

    #[test]
    fn bad_passwords_are_refused() {
        assert_eq!(
            Credentials::from_password("").unwrap_err(),
            CredentialError::Empty
        );
        assert_eq!(
            Credentials::from_password(&"x".repeat(2000)).unwrap_err(),
            CredentialError::TooLong
        );
        assert_eq!(
            Credentials::from_password("a\u{7}b").unwrap_err(),
            CredentialError::Prohibited
        );
    }

    #[test]
    fn scram_keys_match_rfc7677_example() {
        // RFC 7677 §3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, i=4096.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let k = scram_keys("pencil", &salt, 4096).unwrap();
        // The server signature in the RFC is HMAC(ServerKey, AuthMessage); check ServerKey
        // through it.
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                    s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&k.server_key).unwrap();
        m.update(auth.as_bytes());
        assert_eq!(
            b64.encode(m.finalize().into_bytes()),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }
}
