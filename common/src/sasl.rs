//! SASL server side (RFC 4422) on `rsasl`, checked against the location database, for every
//! protocol that authenticates users: the access proxy (IMAP `AUTHENTICATE`/`LOGIN`, POP3
//! `AUTH`/`USER`+`PASS`) and the relay (SMTP `AUTH`).
//!
//! - [`Verifier`] checks a user name and password: the mailbox's argon2id hash, verified off
//!   the async workers (`spawn_blocking`) behind a semaphore, since one verification takes
//!   ~50 ms and ~19 MiB. An unknown (or unparsable) user is verified against a dummy hash, so
//!   the answer and its timing are those of a wrong password; a disabled mailbox fails the same
//!   way.
//! - [`Exchange`] runs one SASL exchange (PLAIN, LOGIN, SCRAM-SHA-256) step by step: the
//!   protocol decodes its framing (IMAP `+ base64`, SMTP `334`, POP3 `+ `) and hands in raw
//!   bytes; each step says what to send back ([`Step`]).
//!
//! rsasl's pitfalls, handled here (see the notes on the IMAP stack): a SCRAM failure never
//! reaches `validate`, so "no validation" is a failure; LOGIN ignores an initial response, so
//! one is fed as the answer to the first challenge; for an unknown user SCRAM would send a
//! fresh random salt each time (which tells that the user does not exist), so it gets a salt
//! derived as HMAC(secret, user) and keys that can never match, and ends in the same
//! `e=invalid-proof` as a wrong password. SCRAM user names with `=` escapes are refused the
//! same way (rsasl does not unescape them).
//!
//! What a login may do next (route to a filer, check the mailbox state for delivery) is the
//! caller's business; this module only says who authenticated.

use std::io::Cursor;
use std::sync::{Arc, Mutex, PoisonError};

use hmac::{Hmac, Mac};
use rand::RngCore as _;
use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::prelude::{
    Mechname, MessageSent, Registry, SASLConfig, SASLServer, Session, SessionError, State,
    Validation,
};
use rsasl::property::{AuthId, AuthzId, Password};
use rsasl::validate::{Validate, ValidationError};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::address::Address;
use crate::location::{Credentials, Directory, MailboxState, SCRAM_ITERATIONS, ScramKeys};

/// A SASL mechanism the platform offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `PLAIN` (RFC 4616): the password in one message.
    Plain,
    /// `LOGIN` (draft-murchison-sasl-login): user name, then password.
    Login,
    /// `SCRAM-SHA-256` (RFC 7677): the password never crosses the wire.
    ScramSha256,
}

impl Mechanism {
    /// Every mechanism, in the order to advertise them (strongest first).
    pub const ALL: [Self; 3] = [Self::ScramSha256, Self::Plain, Self::Login];

    /// The mechanism of this (case-insensitive) name, if offered.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(name))
    }

    /// The registered name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::Login => "LOGIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
        }
    }

    /// Whether the client sends the password itself (PLAIN, LOGIN), which needs TLS.
    pub fn sends_password(self) -> bool {
        matches!(self, Self::Plain | Self::Login)
    }
}

/// The outcome of a credentials check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Good credentials; the mailbox's address in key form.
    Accepted(String),
    /// Wrong password, unknown user, disabled mailbox or malformed input: one answer for all.
    Rejected,
    /// The location database could not be asked: a temporary failure.
    Unavailable,
}

/// Why the SASL machinery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The dummy hash could not be made.
    #[error("cannot make the dummy credentials: {0}")]
    Dummy(String),
    /// rsasl refused its configuration.
    #[error("sasl configuration: {0}")]
    Config(String),
}

/// Checks credentials against the location database. One per service, shared by its sessions.
pub struct Verifier {
    directory: Arc<dyn Directory>,
    /// Permits for argon2 verifications running at once (each holds ~19 MiB).
    slots: Arc<Semaphore>,
    /// Verified against when the user does not exist, so that costs the same time.
    dummy: Arc<Credentials>,
    /// Key of the HMAC that derives unknown users' SCRAM salts.
    salt_key: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("slots", &self.slots.available_permits())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over `directory` running at most `max_concurrent` argon2 verifications at
    /// once. `salt_secret` keys the fake SCRAM salts of unknown users: it must be the same on
    /// every host of the platform (and across restarts), or comparing salts would tell real
    /// users from unknown ones; the platform's proxy secret does.
    pub async fn new(
        directory: Arc<dyn Directory>,
        max_concurrent: usize,
        salt_secret: &[u8],
    ) -> Result<Self, SetupError> {
        let dummy = tokio::task::spawn_blocking(|| {
            let mut raw = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut raw);
            let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            Credentials::from_password(&password)
        })
        .await
        .map_err(|e| SetupError::Dummy(e.to_string()))?
        .map_err(|e| SetupError::Dummy(e.to_string()))?;
        Ok(Self {
            directory,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            dummy: Arc::new(dummy),
            salt_key: salt_secret.to_vec(),
        })
    }

    /// Checks a user name and password (IMAP `LOGIN`, POP3 `USER`/`PASS`, SASL PLAIN and
    /// LOGIN). Takes the time of one argon2 verification whatever the outcome, except when the
    /// database is unavailable.
    pub async fn check_password(&self, user: &str, password: &[u8]) -> Verdict {
        let address = key_of(user);
        let mut found: Option<(String, Credentials, bool)> = None;
        if let Some(address) = address {
            let credentials = match self.directory.credentials(&address).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "credentials lookup failed");
                    return Verdict::Unavailable;
                }
            };
            if let Some(c) = credentials {
                let enabled = match self.directory.mailbox(&address).await {
                    Ok(m) => m.is_some_and(|m| m.state != MailboxState::Disabled),
                    Err(e) => {
                        tracing::warn!(error = %e, "mailbox lookup failed");
                        return Verdict::Unavailable;
                    }
                };
                found = Some((address, c, enabled));
            }
        }
        let credentials = match &found {
            Some((_, c, _)) => Arc::new(c.clone()),
            None => self.dummy.clone(),
        };
        // Invalid UTF-8 can match no stored password; it is verified as "" (which fails at
        // once, for real and unknown users alike).
        let password = String::from_utf8(password.to_vec()).unwrap_or_default();
        let matches = self.verify(credentials, password).await;
        match found {
            Some((address, _, true)) if matches => Verdict::Accepted(address),
            _ => Verdict::Rejected,
        }
    }

    /// Starts a SASL exchange with `mechanism`.
    pub fn start(self: &Arc<Self>, mechanism: Mechanism) -> Result<Exchange, SetupError> {
        let slot: Arc<Mutex<Option<ScramKeys>>> = Arc::default();
        let config = SASLConfig::builder()
            .with_registry(Registry::with_mechanisms(&MECHANISMS))
            .with_callback(Callback { slot: slot.clone() })
            .map_err(|e| SetupError::Config(e.to_string()))?;
        let name = Mechname::parse(mechanism.as_str().as_bytes())
            .map_err(|e| SetupError::Config(e.to_string()))?;
        let session = SASLServer::<Outcome>::new(config)
            .start_suggested(name)
            .map_err(|e| SetupError::Config(e.to_string()))?;
        Ok(Exchange {
            verifier: self.clone(),
            mechanism,
            session,
            slot,
            scram_user: None,
            claimed: None,
        })
    }

    async fn verify(&self, credentials: Arc<Credentials>, password: String) -> bool {
        let Ok(_permit) = self.slots.clone().acquire_owned().await else {
            return false; // the semaphore is never closed
        };
        tokio::task::spawn_blocking(move || credentials.verify(&password))
            .await
            .unwrap_or(false)
    }

    /// The SCRAM keys for `user`: the real ones of an enabled mailbox, or keys no proof can
    /// match, with a salt that stays the same for the same name (derived from the secret).
    async fn scram_keys(&self, user: &str) -> Result<(ScramKeys, Option<String>), LookupFailed> {
        // RFC 5802 §5.1: `=2C` and `=3D` escapes, which rsasl leaves as they are.
        let address = if user.contains('=') {
            None
        } else {
            key_of(user)
        };
        if let Some(address) = address {
            let credentials = self
                .directory
                .credentials(&address)
                .await
                .map_err(|_| LookupFailed)?;
            if let Some(c) = credentials {
                let enabled = self
                    .directory
                    .mailbox(&address)
                    .await
                    .map_err(|_| LookupFailed)?
                    .is_some_and(|m| m.state != MailboxState::Disabled);
                if enabled {
                    return Ok((c.scram, Some(address)));
                }
            }
        }
        Ok((self.fake_scram_keys(user), None))
    }

    fn fake_scram_keys(&self, user: &str) -> ScramKeys {
        let mut salt = vec![0u8; 16];
        if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.salt_key) {
            mac.update(b"scram-salt\0");
            mac.update(user.to_lowercase().as_bytes());
            let out = mac.finalize().into_bytes();
            salt.copy_from_slice(out.get(..16).unwrap_or(&[0u8; 16]));
        }
        let mut stored_key = vec![0u8; 32];
        let mut server_key = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut stored_key);
        rand::rngs::OsRng.fill_bytes(&mut server_key);
        ScramKeys {
            salt,
            iterations: SCRAM_ITERATIONS,
            stored_key,
            server_key,
        }
    }
}

struct LookupFailed;

/// The mechanisms rsasl may start (exactly those of [`Mechanism`]).
static MECHANISMS: [rsasl::prelude::Mechanism; 3] = [
    rsasl::mechanisms::scram::SCRAM_SHA256,
    rsasl::mechanisms::plain::PLAIN,
    rsasl::mechanisms::login::LOGIN,
];

/// What one step of an exchange says to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this challenge (raw bytes; the protocol encodes them) and feed the answer to
    /// [`Exchange::step`].
    Challenge(Vec<u8>),
    /// Authenticated as `address` (key form). `final_data` (SCRAM's server signature) must
    /// reach the client before the success reply: as one more challenge, whose (empty) answer
    /// is then awaited, where the protocol has no other way.
    Success {
        /// The mailbox address in key form.
        address: String,
        /// Additional data with success.
        final_data: Option<Vec<u8>>,
    },
    /// Authentication failed; answer the protocol's failure reply.
    Failure(Failure),
}

/// Why an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad credentials (wrong password, unknown user, disabled mailbox, wrong proof).
    Rejected,
    /// The client's messages do not follow the mechanism.
    Malformed,
    /// The location database could not be asked: a temporary failure.
    Unavailable,
}

/// One SASL exchange. Not `Clone`; drop it to abandon the exchange.
pub struct Exchange {
    verifier: Arc<Verifier>,
    mechanism: Mechanism,
    session: Session<Outcome>,
    /// SCRAM keys for the callback, filled before the client-first message is stepped.
    slot: Arc<Mutex<Option<ScramKeys>>>,
    /// For SCRAM: the address the keys belong to (`None`: fake keys).
    scram_user: Option<Option<String>>,
    /// The user name the client claimed so far (for throttling and logs).
    claimed: Option<String>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("mechanism", &self.mechanism)
            .field("claimed", &self.claimed)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// The mechanism.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The user name the client claimed so far, as given (for throttling per account).
    pub fn claimed_user(&self) -> Option<&str> {
        self.claimed.as_deref()
    }

    /// The first step, with the client's initial response if it sent one (SASL-IR; an empty
    /// one is `Some(b"")`).
    pub async fn begin(&mut self, initial_response: Option<&[u8]>) -> Step {
        match initial_response {
            // rsasl's LOGIN ignores an initial response: take its first challenge, then feed
            // the response as the answer to it.
            Some(ir) if self.mechanism == Mechanism::Login => {
                if let Step::Failure(f) = self.advance(None).await {
                    return Step::Failure(f);
                }
                self.advance(Some(ir)).await
            }
            Some(ir) => self.advance(Some(ir)).await,
            None if self.session.are_we_first() => self.advance(None).await,
            // PLAIN and SCRAM without an initial response: an empty challenge asks for it.
            None => Step::Challenge(Vec::new()),
        }
    }

    /// The next step, with the client's answer to the last challenge.
    pub async fn step(&mut self, response: &[u8]) -> Step {
        self.advance(Some(response)).await
    }

    async fn advance(&mut self, input: Option<&[u8]>) -> Step {
        // LOGIN: the first answer is the user name.
        if self.mechanism == Mechanism::Login
            && self.claimed.is_none()
            && let Some(user) = input
        {
            self.claimed = Some(String::from_utf8_lossy(user).into_owned());
        }
        if self.mechanism == Mechanism::ScramSha256
            && self.scram_user.is_none()
            && let Some(first) = input
        {
            let Some(user) = scram_user_name(first) else {
                return Step::Failure(Failure::Malformed);
            };
            self.claimed = Some(user.clone());
            match self.verifier.scram_keys(&user).await {
                Ok((keys, address)) => {
                    *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(keys);
                    self.scram_user = Some(address);
                }
                Err(LookupFailed) => return Step::Failure(Failure::Unavailable),
            }
        }
        let mut out = Cursor::new(Vec::new());
        let state = match self.session.step(input, &mut out) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(mechanism = self.mechanism.as_str(), error = %e, "sasl step failed");
                return Step::Failure(Failure::Malformed);
            }
        };
        match state {
            State::Running => Step::Challenge(out.into_inner()),
            State::Finished(sent) => {
                let final_data = (sent == MessageSent::Yes).then(|| out.into_inner());
                match self.session.validation() {
                    Some(Claim::Password {
                        authcid,
                        authzid,
                        password,
                    }) => {
                        self.claimed = Some(authcid.clone());
                        let verdict = self.verifier.check_password(&authcid, &password).await;
                        finish(verdict, &authcid, authzid.as_deref(), final_data)
                    }
                    Some(Claim::Proven { authcid, authzid }) => {
                        match self.scram_user.clone().flatten() {
                            Some(address) => finish(
                                Verdict::Accepted(address),
                                &authcid,
                                authzid.as_deref(),
                                final_data,
                            ),
                            None => Step::Failure(Failure::Rejected),
                        }
                    }
                    // SCRAM writes `e=invalid-proof` and never validates: a failure.
                    None => Step::Failure(Failure::Rejected),
                }
            }
        }
    }
}

/// Turns a verdict into a step, refusing an authorization identity other than the user
/// itself (only a filer's trusted proxy login may act for another user, and not through here).
fn finish(
    verdict: Verdict,
    authcid: &str,
    authzid: Option<&str>,
    final_data: Option<Vec<u8>>,
) -> Step {
    match verdict {
        Verdict::Accepted(address) => {
            let own = authzid.filter(|z| !z.is_empty()).is_none_or(|z| {
                z.eq_ignore_ascii_case(authcid) || key_of(z).as_ref() == Some(&address)
            });
            if own {
                Step::Success {
                    address,
                    final_data,
                }
            } else {
                tracing::warn!("refused a login acting for another user");
                Step::Failure(Failure::Rejected)
            }
        }
        Verdict::Rejected => Step::Failure(Failure::Rejected),
        Verdict::Unavailable => Step::Failure(Failure::Unavailable),
    }
}

/// A login name in key form, if it is an address at all.
fn key_of(user: &str) -> Option<String> {
    Address::parse(user.trim()).ok().map(|a| a.key())
}

/// The `n=` user name of a SCRAM client-first message (`gs2-header n=user,r=nonce...`).
fn scram_user_name(first: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(first).ok()?;
    // gs2-cbind-flag "," [authzid] "," then the bare message.
    let mut parts = text.splitn(3, ',');
    let (_flag, _authzid, bare) = (parts.next()?, parts.next()?, parts.next()?);
    let user = bare.strip_prefix("n=")?.split(',').next()?;
    (!user.is_empty()).then(|| user.to_owned())
}

/// What the callback hands back when a mechanism validates.
enum Claim {
    /// PLAIN or LOGIN: checked afterwards, off the callback (the database is async).
    Password {
        authcid: String,
        authzid: Option<String>,
        password: Vec<u8>,
    },
    /// SCRAM: the proof already matched the stored key.
    Proven {
        authcid: String,
        authzid: Option<String>,
    },
}

struct Outcome;

impl Validation for Outcome {
    type Value = Claim;
}

struct Callback {
    slot: Arc<Mutex<Option<ScramKeys>>>,
}

impl SessionCallback for Callback {
    fn callback(
        &self,
        _session: &SessionData,
        _context: &Context<'_>,
        request: &mut Request<'_>,
    ) -> Result<(), SessionError> {
        let keys = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(k) = keys {
            request.satisfy::<ScramStoredPassword<'_>>(&ScramStoredPassword::new(
                k.iterations,
                &k.salt,
                &k.stored_key,
                &k.server_key,
            ))?;
        }
        Ok(())
    }

    fn validate(
        &self,
        session: &SessionData,
        context: &Context<'_>,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let authcid = context.get_ref::<AuthId>().unwrap_or_default().to_owned();
        let authzid = context.get_ref::<AuthzId>().map(str::to_owned);
        let claim = if session.mechanism().mechanism.as_str().starts_with("SCRAM-") {
            Claim::Proven { authcid, authzid }
        } else {
            Claim::Password {
                authcid,
                authzid,
                password: context.get_ref::<Password>().unwrap_or_default().to_vec(),
            }
        };
        validate.with::<Outcome, _>(|| Ok(claim))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
