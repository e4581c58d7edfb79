use std::sync::OnceLock;

use base64::Engine as _;

use super::*;
use crate::location::{Filer, FilerState, NewMailbox, Sqlite};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn creds() -> Credentials {
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password("pencil").unwrap())
        .clone()
}

async fn verifier() -> (tempfile::TempDir, Arc<Verifier>) {
    let dir = tempfile::tempdir().unwrap();
    let db = Sqlite::open(&dir.path().join("location.db")).unwrap();
    db.add_filer(&Filer {
        name: "f1".into(),
        lmtp: "127.0.0.1:1".into(),
        imap: "127.0.0.1:1".into(),
        pop3: "127.0.0.1:1".into(),
        state: FilerState::Up,
        weight: 1,
    })
    .await
    .unwrap();
    db.add_domain("example.test").await.unwrap();
    for user in ["user@example.test", "off@example.test"] {
        db.add_mailbox(NewMailbox {
            address: user.into(),
            credentials: creds(),
            quota: 0,
            filer: None,
        })
        .await
        .unwrap();
    }
    db.set_mailbox_state("off@example.test", MailboxState::Disabled)
        .await
        .unwrap();
    let v = Verifier::new(Arc::new(db), 2, b"salt-secret-0123456789")
        .await
        .unwrap();
    (dir, Arc::new(v))
}

#[tokio::test]
async fn passwords_are_checked_and_every_failure_looks_the_same() {
    let (_dir, v) = verifier().await;
    let ok = v.check_password("User@Example.TEST", b"pencil").await;
    assert_eq!(ok, Verdict::Accepted("user@example.test".into()));
    for (user, pw) in [
        ("user@example.test", &b"wrong"[..]),
        ("nobody@example.test", b"pencil"),
        ("off@example.test", b"pencil"),
        ("not an address", b"pencil"),
        ("user@example.test", b"\xff\xfe"),
    ] {
        assert_eq!(
            v.check_password(user, pw).await,
            Verdict::Rejected,
            "{user}"
        );
    }
}

#[tokio::test]
async fn an_unknown_user_costs_an_argon2_verification_too() {
    let (_dir, v) = verifier().await;
    // Warm up, then compare: the unknown user is verified against the dummy hash.
    v.check_password("user@example.test", b"wrong").await;
    let t = tokio::time::Instant::now();
    v.check_password("user@example.test", b"wrong").await;
    let known = t.elapsed();
    let t = tokio::time::Instant::now();
    v.check_password("nobody@example.test", b"wrong").await;
    let unknown = t.elapsed();
    assert!(
        unknown * 3 > known && known * 3 > unknown,
        "known {known:?} vs unknown {unknown:?}"
    );
}

#[tokio::test]
async fn plain_with_and_without_initial_response() {
    let (_dir, v) = verifier().await;
    let mut x = v.start(Mechanism::Plain).unwrap();
    assert_eq!(
        x.begin(Some(b"\0user@example.test\0pencil")).await,
        Step::Success {
            address: "user@example.test".into(),
            final_data: None
        }
    );
    let mut x = v.start(Mechanism::Plain).unwrap();
    assert_eq!(x.begin(None).await, Step::Challenge(Vec::new()));
    assert_eq!(
        x.step(b"user@example.test\0user@example.test\0pencil")
            .await,
        Step::Success {
            address: "user@example.test".into(),
            final_data: None
        }
    );
    for bad in [
        &b"\0user@example.test\0wrong"[..],
        b"\0nobody@example.test\0pencil",
        b"\0off@example.test\0pencil",
        // Acting for another user is refused even with the right password.
        b"off@example.test\0user@example.test\0pencil",
    ] {
        let mut x = v.start(Mechanism::Plain).unwrap();
        assert_eq!(
            x.begin(Some(bad)).await,
            Step::Failure(Failure::Rejected),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut x = v.start(Mechanism::Plain).unwrap();
    assert_eq!(
        x.begin(Some(b"no nul at all")).await,
        Step::Failure(Failure::Malformed)
    );
}

#[tokio::test]
async fn login_with_and_without_initial_response() {
    let (_dir, v) = verifier().await;
    let mut x = v.start(Mechanism::Login).unwrap();
    let Step::Challenge(_) = x.begin(None).await else {
        panic!("LOGIN asks for the user name first")
    };
    let Step::Challenge(_) = x.step(b"user@example.test").await else {
        panic!("then for the password")
    };
    assert_eq!(
        x.step(b"pencil").await,
        Step::Success {
            address: "user@example.test".into(),
            final_data: None
        }
    );
    // With the user name as initial response (rsasl would drop it).
    let mut x = v.start(Mechanism::Login).unwrap();
    let Step::Challenge(_) = x.begin(Some(b"user@example.test")).await else {
        panic!("asks for the password")
    };
    assert_eq!(x.claimed_user(), Some("user@example.test"));
    assert_eq!(x.step(b"wrong").await, Step::Failure(Failure::Rejected));
}

/// A SCRAM-SHA-256 client (RFC 5802, RFC 7677), independent of rsasl.
pub(crate) struct ScramClient {
    user: String,
    password: String,
    nonce: String,
    first_bare: String,
    server_signature: Vec<u8>,
}

impl ScramClient {
    pub(crate) fn new(user: &str, password: &str) -> Self {
        let nonce = B64.encode(rand::random::<[u8; 18]>());
        Self {
            user: user.into(),
            password: password.into(),
            first_bare: format!("n={user},r={nonce}"),
            nonce,
            server_signature: Vec::new(),
        }
    }

    pub(crate) fn first(&self) -> Vec<u8> {
        format!("n,,{}", self.first_bare).into_bytes()
    }

    /// The salt and iteration count from the server-first message, and the client-final.
    pub(crate) fn final_message(&mut self, server_first: &[u8]) -> (Vec<u8>, u32, Vec<u8>) {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let attr = |k: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        let (r, s, i) = (attr("r="), attr("s="), attr("i="));
        assert!(r.starts_with(&self.nonce));
        let salt = B64.decode(&s).unwrap();
        let iterations: u32 = i.parse().unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2::<Hmac<Sha256>>(self.password.as_bytes(), &salt, iterations, &mut salted)
            .unwrap();
        let hmac = |key: &[u8], msg: &[u8]| {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        };
        use sha2::Digest as _;
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(&client_key);
        let without_proof = format!("c=biws,r={r}");
        let auth = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = hmac(&stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        self.server_signature = hmac(&hmac(&salted, b"Server Key"), auth.as_bytes());
        let _ = &self.user;
        (
            salt,
            iterations,
            format!("{without_proof},p={}", B64.encode(proof)).into_bytes(),
        )
    }

    pub(crate) fn verifies(&self, server_final: &[u8]) -> bool {
        server_final == format!("v={}", B64.encode(&self.server_signature)).as_bytes()
    }
}

async fn scram(v: &Arc<Verifier>, user: &str, password: &str) -> (Vec<u8>, Step) {
    let mut c = ScramClient::new(user, password);
    let mut x = v.start(Mechanism::ScramSha256).unwrap();
    let Step::Challenge(server_first) = x.begin(Some(&c.first())).await else {
        panic!("server-first expected")
    };
    let (salt, iterations, last) = c.final_message(&server_first);
    assert_eq!(iterations, SCRAM_ITERATIONS);
    let step = x.step(&last).await;
    if let Step::Success {
        final_data: Some(f),
        ..
    } = &step
    {
        assert!(c.verifies(f), "server signature");
    }
    (salt, step)
}

#[tokio::test]
async fn scram_succeeds_and_every_failure_is_an_invalid_proof_with_a_stable_salt() {
    let (_dir, v) = verifier().await;
    let (salt, step) = scram(&v, "user@example.test", "pencil").await;
    assert_eq!(salt, creds().scram.salt);
    assert!(
        matches!(&step, Step::Success { address, final_data: Some(_) } if address == "user@example.test"),
        "{step:?}"
    );
    let (_, step) = scram(&v, "user@example.test", "wrong").await;
    assert_eq!(step, Step::Failure(Failure::Rejected));
    // Unknown user: the same failure, and the same salt every time (no fresh random one).
    let (a, step) = scram(&v, "nobody@example.test", "pencil").await;
    assert_eq!(step, Step::Failure(Failure::Rejected));
    let (b, _) = scram(&v, "nobody@example.test", "pencil").await;
    assert_eq!(a, b);
    assert_eq!(a.len(), creds().scram.salt.len());
    let (_, step) = scram(&v, "off@example.test", "pencil").await;
    assert_eq!(step, Step::Failure(Failure::Rejected));
    let (_, step) = scram(&v, "user=2C@example.test", "pencil").await;
    assert_eq!(step, Step::Failure(Failure::Rejected));
}

#[test]
fn mechanism_names() {
    assert_eq!(
        Mechanism::parse("scram-sha-256"),
        Some(Mechanism::ScramSha256)
    );
    assert_eq!(Mechanism::parse("CRAM-MD5"), None);
    assert!(Mechanism::Plain.sends_password());
    assert!(!Mechanism::ScramSha256.sends_password());
    assert_eq!(
        scram_user_name(b"n,a=x,n=alice@x.test,r=abc").as_deref(),
        Some("alice@x.test")
    );
    assert_eq!(scram_user_name(b"garbage"), None);
}
