//! The SASL step loop of `common::sasl::Verifier` over a real (sqlite) location database with
//! one domain and one mailbox (`user@example.test`, password `pencil`), created once per
//! process.
//!
//! Byte 0: mechanism (`% 3`: SCRAM-SHA-256, PLAIN, LOGIN) and, with bit 0x04, whether the first
//! line is sent as the initial response (SASL-IR) rather than after an empty begin. The rest,
//! split on `\n`, are the client's successive (raw, already base64-decoded) messages; at most
//! 8 steps. PLAIN/LOGIN with a complete user/password run one argon2 verification, so
//! executions are slow on such inputs by design.
#![no_main]

use std::sync::{Arc, OnceLock};

use common::location::{
    Credentials, Directory, Filer, FilerState, NewMailbox, Sqlite,
};
use common::sasl::{Mechanism, Step, Verifier};
use libfuzzer_sys::fuzz_target;

struct Env {
    rt: tokio::runtime::Runtime,
    verifier: Arc<Verifier>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Sqlite::open(&dir.path().join("location.db")).expect("open sqlite");
        let verifier = rt.block_on(async {
            db.add_filer(&Filer {
                name: "f1".into(),
                lmtp: "127.0.0.1:1".into(),
                imap: "127.0.0.1:1".into(),
                pop3: "127.0.0.1:1".into(),
                state: FilerState::Up,
                weight: 1,
            })
            .await
            .expect("add filer");
            db.add_domain("example.test").await.expect("add domain");
            db.add_mailbox(NewMailbox {
                address: "user@example.test".into(),
                credentials: Credentials::from_password("pencil").expect("credentials"),
                quota: 0,
                filer: None,
            })
            .await
            .expect("add mailbox");
            Verifier::new(Arc::new(db), 2, b"fuzz-salt-secret-0123456789")
                .await
                .expect("verifier")
        });
        Env { rt, verifier: Arc::new(verifier), _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let env = env();
    let mechanism = match sel % 3 {
        0 => Mechanism::ScramSha256,
        1 => Mechanism::Plain,
        _ => Mechanism::Login,
    };
    let with_ir = sel & 0x04 != 0;
    let mut lines = rest.split(|&b| b == b'\n');
    env.rt.block_on(async {
        let mut exchange = env.verifier.start(mechanism).expect("start");
        assert_eq!(exchange.mechanism(), mechanism);
        let mut step = if with_ir {
            let ir = lines.next().unwrap_or_default();
            exchange.begin(Some(ir)).await
        } else {
            exchange.begin(None).await
        };
        for _ in 0..8 {
            match step {
                Step::Challenge(_) => {}
                Step::Success { address, .. } => {
                    assert_eq!(address, "user@example.test", "success for another mailbox");
                    return;
                }
                Step::Failure(_) => return,
            }
            let Some(line) = lines.next() else { return };
            let _ = exchange.claimed_user();
            step = exchange.step(line).await;
        }
    });
});
